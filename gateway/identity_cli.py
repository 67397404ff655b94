"""``pocketllm users create|list|disable|enable|password`` and ``pocketllm keys create|list|revoke``: the
store, directly."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

from auth.authenticate import Authenticator
from auth.errors import LastAdminError
from auth.passwords import hash_password
from auth.principal import ALL_SCOPES
from auth.store import UserExistsError
from gateway.security import build_authenticator
from gateway.settings import Settings


def add_commands(commands: Any, settings_loader: Any) -> None:
    """Register the ``users`` and ``keys`` commands on the CLI's subparsers."""
    users = commands.add_parser("users", help="create, list, disable and enable users; set passwords")
    users.add_argument("--config", default=None, help="TOML configuration file")
    sub = users.add_subparsers(dest="users_command", required=True)
    create = sub.add_parser("create", help="create a user (password from --password-stdin or a prompt)")
    create.add_argument("username")
    create.add_argument("--role", choices=["user", "admin"], default="user")
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    sub.add_parser("list", help="list users")
    disable = sub.add_parser("disable", help="disable a user (by name)")
    disable.add_argument("username")
    enable = sub.add_parser("enable", help="enable a disabled user (by name)")
    enable.add_argument("username")
    password = sub.add_parser("password", help="set a user's password; their older tokens are refused")
    password.add_argument("username")
    password.add_argument("--password-stdin", action="store_true", help="read it from standard input")
    users.set_defaults(handler=lambda args: _run(settings_loader(args), _users, args))

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    keys.add_argument("--config", default=None, help="TOML configuration file")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key; the full key is printed once")
    create.add_argument("username")
    create.add_argument("--scope", action="append", choices=sorted(ALL_SCOPES), dest="scopes")
    create.add_argument("--model", action="append", dest="models", help="allow only these models (repeat)")
    create.add_argument("--expires-in-days", type=float, default=None)
    sub.add_parser("list", help="list keys (prefix and last four characters only)")
    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=lambda args: _run(settings_loader(args), _keys, args))


def _run(settings: Settings, command: Any, args: argparse.Namespace) -> int:
    async def main() -> int:
        authenticator = build_authenticator(settings)
        try:
            code: int = await command(authenticator, args)
            return code
        finally:
            await authenticator.store.close()

    return asyncio.run(main())


def _say(text: str) -> None:
    print(text)


def _read_password(args: argparse.Namespace) -> str | None:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("password: ")
    if len(password) < 8:
        _say("pocketllm: the password needs at least 8 characters")
        return None
    return password


async def _users(auth: Authenticator, args: argparse.Namespace) -> int:
    if args.users_command == "create":
        password = _read_password(args)
        if password is None:
            return 2
        try:
            user = await auth.create_user(args.username, password, args.role)
        except UserExistsError:
            _say(f"pocketllm: the user {args.username!r} exists already")
            return 1
        _say(f"created {user.role} {user.username} ({user.id})")
        return 0
    if args.users_command == "list":
        for user in await auth.store.list_users():
            state = "disabled" if user.disabled else "active"
            _say(f"{user.id}  {user.username:24} {user.role:6} {state}")
        return 0
    target = await auth.store.get_user_by_name(args.username)
    if target is None:
        _say(f"pocketllm: no user {args.username!r}")
        return 1
    if args.users_command == "enable":
        await auth.store.enable_user(target.id)
        _say(f"enabled {target.username}")
        return 0
    if args.users_command == "password":
        password = _read_password(args)
        if password is None:
            return 2
        digest = await asyncio.to_thread(hash_password, password, auth.passwords)
        await auth.store.change_password(target.id, digest)
        _say(f"changed the password of {target.username}; their older tokens are refused")
        return 0
    try:
        await auth.store.disable_user(target.id)
    except LastAdminError as exc:
        _say(f"pocketllm: {exc}")
        return 1
    _say(f"disabled {target.username}")
    return 0


async def _keys(auth: Authenticator, args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        user = await auth.store.get_user_by_name(args.username)
        if user is None:
            _say(f"pocketllm: no user {args.username!r}")
            return 1
        expires = time.time() + args.expires_in_days * 86400 if args.expires_in_days else None
        try:
            issued = await auth.create_key(
                user, frozenset(args.scopes) if args.scopes else None, args.models, expires
            )
        except ValueError as exc:
            _say(f"pocketllm: {exc}")
            return 2
        _say(f"key id {issued.record.id} for {user.username} (scopes: {', '.join(issued.record.scopes)})")
        _say("the key (shown this once):")
        _say(issued.key)
        return 0
    if args.keys_command == "list":
        names = {u.id: u.username for u in await auth.store.list_users()}
        for key in await auth.store.list_keys():
            state = "revoked" if key.revoked_at else "active"
            _say(
                f"{key.id}  sk-pl-...{key.last4}  {names.get(key.user_id, '?'):16} "
                f"{','.join(key.scopes):16} {state}"
            )
        return 0
    if not await auth.store.revoke_key(args.key_id):
        _say(f"pocketllm: no key {args.key_id!r}")
        return 1
    _say(f"revoked {args.key_id}")
    return 0
