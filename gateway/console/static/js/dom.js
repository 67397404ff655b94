// Element building without HTML parsing: strings always become text nodes, so nothing the server or
// the model sends can turn into markup.

/**
 * Create an element.
 * @param {string} tag element name
 * @param {Object<string, *>} [props] properties (className, type, ...); `dataset` and `attrs` objects
 * @param {...(Node|string|number|null|undefined)} children nodes or text
 * @returns {HTMLElement}
 */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "attrs") for (const [a, v] of Object.entries(value)) node.setAttribute(a, v);
    else node[name] = value;
  }
  append(node, ...children);
  return node;
}

/** Append nodes or text (never parsed as HTML) to `parent`. */
export function append(parent, ...children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** `document.getElementById`, failing loudly on a missing id. */
export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`no element #${id}`);
  return node;
}

/** A unix time in seconds as a short local date and time. */
export function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
}
