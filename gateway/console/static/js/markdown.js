// A small Markdown subset rendered to DOM nodes: fenced code blocks, headings, lists, quotes,
// paragraphs, `code`, **bold**, *italic* and http(s) links. Model output is never parsed as HTML:
// every piece of text becomes a text node, so `<img src=x onerror=...>` shows as those characters.

import { h } from "./dom.js";

const FENCE = /^\s*```\s*([\w+.#-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const INLINE = /(`+)([^`]+?)\1|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;

/**
 * Render Markdown text as a fragment of DOM nodes (no HTML parsing anywhere).
 * @param {string} text the source (may be a partial reply: an open code fence runs to the end)
 * @returns {DocumentFragment}
 */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];
  let list = null;

  const flushParagraph = () => {
    if (paragraph.length) {
      const p = h("p");
      paragraph.forEach((line, i) => {
        if (i) p.append(h("br"));
        inline(p, line);
      });
      out.append(p);
      paragraph = [];
    }
  };
  const flushList = () => {
    list = null;
  };
  const listItem = (kind, content) => {
    flushParagraph();
    if (!list || list.tagName !== kind.toUpperCase()) {
      list = h(kind);
      out.append(list);
    }
    list.append(inline(h("li"), content));
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flushParagraph();
      flushList();
      const code = [];
      for (i++; i < lines.length && !FENCE.test(lines[i]); i++) code.push(lines[i]);
      out.append(codeBlock(fence[1], code.join("\n")));
      continue;
    }
    let m;
    if (!line.trim()) {
      flushParagraph();
      flushList();
    } else if ((m = line.match(HEADING))) {
      flushParagraph();
      flushList();
      // replies sit under the page's own headings: a reply's "#" is a level-3 heading at most
      out.append(inline(h(`h${Math.min(m[1].length + 2, 6)}`), m[2]));
    } else if ((m = line.match(BULLET))) {
      listItem("ul", m[1]);
    } else if ((m = line.match(NUMBERED))) {
      listItem("ol", m[1]);
    } else if ((m = line.match(QUOTE))) {
      flushParagraph();
      flushList();
      out.append(inline(h("blockquote"), m[1]));
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph();
  return out;
}

function codeBlock(language, source) {
  const lang = language.toLowerCase().replace(/[^a-z0-9+#.-]/g, "");
  const code = h("code", {}, source);
  if (lang) code.className = `language-${lang}`;
  return h("figure", { className: "code" }, lang ? h("figcaption", {}, lang) : null, h("pre", {}, code));
}

/** Append `text` to `parent` with inline code, bold, italic and links; returns `parent`. */
function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    if (m[2] !== undefined) parent.append(h("code", {}, m[2]));
    else if (m[3] !== undefined) parent.append(h("strong", {}, m[3]));
    else if (m[4] !== undefined) parent.append(h("em", {}, m[4]));
    else parent.append(link(m[5], m[6]));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
  return parent;
}

function link(label, target) {
  let url;
  try {
    url = new URL(target);
  } catch {
    return `[${label}](${target})`;
  }
  // only web links: a javascript: or data: URL stays text
  if (url.protocol !== "https:" && url.protocol !== "http:") return `[${label}](${target})`;
  return h("a", { href: url.href, rel: "noopener noreferrer nofollow", target: "_blank" }, label);
}
