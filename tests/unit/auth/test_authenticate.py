"""Credentials to principals, logins, users and keys, over a real store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from auth.authenticate import Authenticator, credential_from_headers
from auth.errors import (
    AuthenticationError,
    InvalidCredentialsError,
    KeyPolicyError,
    LoginBusyError,
    LoginThrottledError,
    UserExistsError,
)
from auth.keys import KEY_PREFIX
from auth.limits import CredentialLimits, LimitOverride
from auth.passwords import ScryptParams, parse_hash, verify_password
from auth.sqlite_store import SQLiteStore
from auth.store import IdentityStore, User
from auth.throttle import LoginThrottle
from auth.tokens import ExternalProvider, TokenSettings, decode_token
from tests.unit.auth.conftest import FAST, CountingStore, FakeClock, StoreOpener
from tests.unit.auth.test_credentials import _forge_hs256, _pem

pytestmark = pytest.mark.anyio

TOKENS = TokenSettings("t" * 48, issuer="https://gateway.example", audience="pocketllm")
IDP = "https://idp.example"


@pytest.fixture
async def auth(store: IdentityStore, clock: FakeClock) -> Authenticator:
    return Authenticator(
        store, TOKENS, FAST, throttle=LoginThrottle(clock=clock), clock=clock, monotonic=clock
    )


@pytest.fixture
async def alice(auth: Authenticator) -> User:
    return await auth.create_user("alice", "alice-password", "user")


@pytest.fixture
async def root(auth: Authenticator) -> User:
    return await auth.create_user("root", "root-password", "admin")


def test_credentials_from_headers() -> None:
    assert credential_from_headers("Bearer abc", None) == "abc"
    assert credential_from_headers("bearer   abc  ", None) == "abc"
    assert credential_from_headers("BEARER abc", "other") == "abc"
    assert credential_from_headers("Basic dXNlcjpwdw==", "key") == "key"
    assert credential_from_headers("Bearer ", " key ") == "key"
    assert credential_from_headers(None, None) is None
    assert credential_from_headers("Bearer", "") is None
    assert credential_from_headers("Token abc", None) is None


async def test_missing_or_malformed_credentials(auth: Authenticator) -> None:
    for authorization, api_key in ((None, None), ("", ""), ("Basic abc", None)):
        with pytest.raises(AuthenticationError, match="missing credentials"):
            await auth.authenticate(authorization, api_key)
    for credential in ("sk-pl-short", KEY_PREFIX + "A" * 43, "not-a-jwt", "x" * 10_000):
        with pytest.raises(AuthenticationError) as caught:
            await auth.authenticate(f"Bearer {credential}")
        assert credential not in str(caught.value)


async def test_an_api_key_gives_its_scopes_and_models(auth: Authenticator, alice: User) -> None:
    issued = await auth.create_key(alice, models=["smol"])
    assert issued.key.startswith(KEY_PREFIX) and issued.record.last4 == issued.key[-4:]
    for principal in (
        await auth.authenticate(f"Bearer {issued.key}"),
        await auth.authenticate(None, issued.key),
        await auth.authenticate("Basic whatever", issued.key),
    ):
        assert (principal.user_id, principal.username, principal.role) == (alice.id, "alice", "user")
        assert principal.scopes == {"inference"} and principal.key_id == issued.record.id
        assert principal.can_use_model("smol") and not principal.can_use_model("other")
        assert not principal.is_admin


async def test_a_revoked_key_is_refused_on_its_next_call(auth: Authenticator, alice: User) -> None:
    issued = await auth.create_key(alice)
    other = await auth.create_key(alice)
    assert (await auth.authenticate(f"Bearer {issued.key}")).key_id == issued.record.id
    assert await auth.store.revoke_key(issued.record.id)  # through the same store: seen at once
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.authenticate(f"Bearer {issued.key}")
    assert (await auth.authenticate(f"Bearer {other.key}")).key_id == other.record.id


async def test_an_api_key_costs_at_most_one_round_trip(store: IdentityStore, clock: FakeClock) -> None:
    counting = CountingStore(store)
    cached = Authenticator(counting, TOKENS, FAST, clock=clock, monotonic=clock)  # type: ignore[arg-type]
    uncached = Authenticator(counting, TOKENS, FAST, clock=clock, key_cache_ttl_s=0)  # type: ignore[arg-type]
    user = await cached.create_user("alice", "pw", "user")
    issued = await cached.create_key(user)
    await counting.set_limit_override(f"key:{issued.record.id}", LimitOverride(rpm=4))
    await counting.set_limit_override(f"user:{user.id}", LimitOverride(tpm=40))
    counting.calls.clear()
    for _ in range(3):
        principal = await uncached.authenticate(None, issued.key)
        assert principal.user_id == user.id  # with the limits of the key and its owner, from that one query
        assert principal.limits == CredentialLimits(LimitOverride(rpm=4), LimitOverride(tpm=40))
        assert principal.known_overrides() == {
            f"key:{issued.record.id}": LimitOverride(rpm=4),
            f"user:{user.id}": LimitOverride(tpm=40),
        }
    assert counting.calls == ["get_key_and_owner"] * 3
    counting.calls.clear()
    for _ in range(3):
        assert (await cached.authenticate(None, issued.key)).user_id == user.id
        clock.advance(0.5)
    assert counting.calls == ["get_key_and_owner"]  # then from memory
    clock.advance(1.0)  # 2 s after the lookup: stale
    await cached.authenticate(None, issued.key)
    assert counting.calls == ["get_key_and_owner"] * 2
    for bad in (issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B"),) * 2:
        with pytest.raises(AuthenticationError, match="invalid API key"):
            await cached.authenticate(None, bad)
    assert counting.calls == ["get_key_and_owner"] * 4  # unknown keys are never cached


async def test_one_of_our_tokens_costs_one_round_trip_every_time(
    store: IdentityStore, clock: FakeClock
) -> None:
    counting = CountingStore(store)
    auth = Authenticator(counting, TOKENS, FAST, clock=clock, monotonic=clock)  # type: ignore[arg-type]
    alice = await auth.create_user("alice", "alice-password", "user")
    _, token = await auth.login("alice", "alice-password", "c")
    await counting.set_limit_override(f"user:{alice.id}", LimitOverride(rpm=3))
    counting.calls.clear()
    for _ in range(3):  # never cached: a logout is seen by the next request
        principal = await auth.authenticate(f"Bearer {token}")
        assert principal.user_id == alice.id and principal.key_id is None
        assert principal.limits == CredentialLimits(user=LimitOverride(rpm=3))
        assert principal.known_overrides() == {f"user:{alice.id}": LimitOverride(rpm=3)}
    assert counting.calls == ["get_token_owner"] * 3  # the user, the revocation, the limits: one query
    await auth.logout(principal)
    counting.calls.clear()
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.authenticate(f"Bearer {token}")
    assert counting.calls == ["get_token_owner"]


async def test_a_keys_limits_are_as_fresh_as_its_lookup(open_store: StoreOpener, clock: FakeClock) -> None:
    replica_a, replica_b = open_store(), open_store()  # two store objects on one database
    try:
        here = Authenticator(replica_a, TOKENS, FAST, clock=clock, monotonic=clock, key_cache_ttl_s=2.0)
        there = Authenticator(replica_b, TOKENS, FAST, clock=clock, monotonic=clock, key_cache_ttl_s=2.0)
        alice = await here.create_user("alice", "pw", "user")
        issued = await here.create_key(alice)
        for side in (here, there):
            assert (await side.authenticate(None, issued.key)).limits == CredentialLimits()
        for opened in (replica_a, replica_b):  # PostgreSQL: its LISTEN clears the cache once on connecting
            listening = getattr(opened, "listening", None)
            if isinstance(listening, asyncio.Event):
                await asyncio.wait_for(listening.wait(), 10)
        await there.authenticate(None, issued.key)  # cached again (the clock has not moved)
        await there.store.set_limit_override(f"key:{issued.record.id}", LimitOverride(rpm=5))
        await there.store.set_limit_override(f"user:{alice.id}", LimitOverride(concurrency=1))
        changed = CredentialLimits(LimitOverride(rpm=5), LimitOverride(concurrency=1))
        assert (await there.authenticate(None, issued.key)).limits == changed  # where it was set: at once
        if replica_a.dialect == "sqlite":  # nothing tells another process: the cached lookup stands
            assert (await here.authenticate(None, issued.key)).limits == CredentialLimits()
        clock.advance(2.0)  # PostgreSQL told the other replica at once; the TTL bounds it anyway
        assert (await here.authenticate(None, issued.key)).limits == changed
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_a_change_made_on_another_replica_is_seen_within_the_cache_ttl(
    open_store: StoreOpener, clock: FakeClock
) -> None:
    replica_a, replica_b = open_store(), open_store()  # two store objects on one database
    try:
        here = Authenticator(replica_a, TOKENS, FAST, clock=clock, monotonic=clock, key_cache_ttl_s=2.0)
        there = Authenticator(replica_b, TOKENS, FAST, clock=clock, monotonic=clock, key_cache_ttl_s=2.0)
        alice = await here.create_user("alice", "pw", "user")
        bob = await here.create_user("bob", "pw", "user")
        alices, bobs = await here.create_key(alice), await here.create_key(bob)
        for key in (alices.key, bobs.key):
            await here.authenticate(None, key)
            await there.authenticate(None, key)
        assert await there.store.revoke_key(alices.record.id)
        await there.store.disable_user(bob.id)
        for key, why in ((alices.key, "revoked"), (bobs.key, "disabled")):
            with pytest.raises(AuthenticationError, match=why):
                await there.authenticate(None, key)  # where it was done: at once
        # elsewhere: at once where the backend announces changes (PostgreSQL), after the TTL at the latest
        clock.advance(2.0)
        for key, why in ((alices.key, "revoked"), (bobs.key, "disabled")):
            with pytest.raises(AuthenticationError, match=why):
                await here.authenticate(None, key)  # within the stated bound
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_the_key_cache_is_bounded(auth: Authenticator, alice: User) -> None:
    auth.key_cache.max_entries = 3
    keys = [await auth.create_key(alice) for _ in range(5)]
    for issued in keys:
        await auth.authenticate(None, issued.key)
    assert len(auth.key_cache) == 3


async def test_an_expired_key_is_refused(auth: Authenticator, alice: User, clock: FakeClock) -> None:
    issued = await auth.create_key(alice, expires_at=clock() + 60)
    assert await auth.authenticate(None, issued.key)
    clock.advance(59)
    assert await auth.authenticate(None, issued.key)
    clock.advance(1)
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.authenticate(None, issued.key)


async def test_a_disabled_user_is_refused_with_keys_and_tokens(auth: Authenticator, alice: User) -> None:
    issued = await auth.create_key(alice)
    _, token = await auth.login("alice", "alice-password", "c")
    assert await auth.authenticate(f"Bearer {token}")
    await auth.store.disable_user(alice.id)
    for header in (f"Bearer {issued.key}", f"Bearer {token}"):
        with pytest.raises(AuthenticationError, match="disabled"):
            await auth.authenticate(header)
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await auth.login("alice", "alice-password", "c")


async def test_jwt_scopes_follow_the_role(auth: Authenticator, alice: User, root: User) -> None:
    _, admin_token = await auth.login("root", "root-password", "c")
    admin = await auth.authenticate(f"Bearer {admin_token}")
    assert admin.scopes == {"inference", "admin"} and admin.is_admin and admin.key_id is None
    assert admin.allowed_models is None and admin.user_id == root.id
    _, user_token = await auth.login("alice", "alice-password", "c")
    user = await auth.authenticate(f"Bearer {user_token}")
    assert user.scopes == {"inference"} and not user.is_admin and user.user_id == alice.id


async def test_a_token_for_an_unknown_user_or_from_another_secret_is_refused(
    auth: Authenticator, alice: User
) -> None:
    from auth.tokens import issue_token  # noqa: PLC0415

    with pytest.raises(AuthenticationError, match="does not exist"):
        await auth.authenticate(f"Bearer {issue_token('0' * 32, 'ghost', 'admin', TOKENS)}")
    forged = TokenSettings("f" * 48, issuer=TOKENS.issuer, audience=TOKENS.audience)
    with pytest.raises(AuthenticationError, match="invalid"):
        await auth.authenticate(f"Bearer {issue_token(alice.id, 'alice', 'admin', forged)}")


async def test_admin_scope_needs_an_admin_owner(auth: Authenticator, alice: User, root: User) -> None:
    with pytest.raises(KeyPolicyError, match="admin"):
        await auth.create_key(alice, frozenset({"admin"}))
    with pytest.raises(KeyPolicyError, match="unknown scopes: root"):
        await auth.create_key(root, frozenset({"inference", "root"}))
    with pytest.raises(ValueError, match="at least one scope"):
        await auth.create_key(root, frozenset())
    admin_key = await auth.create_key(root, frozenset({"admin"}))
    principal = await auth.authenticate(None, admin_key.key)
    assert principal.scopes == {"admin"} and principal.is_admin and not principal.has_scope("inference")
    # a key holding admin scope whose owner is not an admin (planted, or the role was lost) loses it
    planted_key = "sk-pl-" + "P" * 43
    from auth.keys import hash_api_key  # noqa: PLC0415

    await auth.store.create_key(
        alice.id, hash_api_key(planted_key), "PPPP", ["admin", "inference"], None, None
    )
    planted = await auth.authenticate(None, planted_key)
    assert planted.scopes == {"inference"} and not planted.is_admin


async def test_login(auth: Authenticator, alice: User, clock: FakeClock) -> None:
    user, token = await auth.login("alice", "alice-password", "10.0.0.1")
    assert user.id == alice.id
    claims = decode_token(token, TOKENS)
    assert claims.sub == alice.id and claims.username == "alice" and abs(claims.iat - time.time()) < 5
    touched = await auth.store.get_user(alice.id)
    assert touched is not None and touched.last_login_at == clock()
    with pytest.raises(AuthenticationError) as wrong:
        await auth.login("alice", "wrong-password", "10.0.0.1")
    with pytest.raises(AuthenticationError) as unknown:
        await auth.login("nobody", "alice-password", "10.0.0.1")
    assert str(wrong.value) == str(unknown.value) == "invalid username or password"
    assert "wrong-password" not in str(wrong.value)


async def test_a_failed_password_check_is_invalid_credentials(auth: Authenticator, alice: User) -> None:
    """A wrong login or current password, or an account gone before its password change, is
    ``InvalidCredentialsError`` (401 ``invalid_credentials`` in the gateway's table); a refused token is not."""
    _, token = await auth.login("alice", "alice-password", "c")
    principal = await auth.authenticate(f"Bearer {token}")
    with pytest.raises(InvalidCredentialsError, match="invalid username or password"):
        await auth.login("alice", "wrong-password", "c")
    with pytest.raises(InvalidCredentialsError, match="invalid username or password"):
        await auth.login("nobody", "alice-password", "c")
    with pytest.raises(InvalidCredentialsError, match="the current password is wrong"):
        await auth.change_password(principal, "wrong-password", "new-password-1", "c")
    await auth.store.disable_user(alice.id)
    with pytest.raises(InvalidCredentialsError, match="disabled"):
        await auth.change_password(principal, "alice-password", "new-password-1", "c")
    with pytest.raises(AuthenticationError, match="disabled") as refused:
        await auth.authenticate(f"Bearer {token}")
    assert not isinstance(refused.value, InvalidCredentialsError)


async def test_repeated_failed_logins_slow_the_guesser_not_the_owner(
    auth: Authenticator, alice: User, clock: FakeClock
) -> None:
    for _ in range(5):
        with pytest.raises(AuthenticationError):
            await auth.login("alice", "guess", "10.0.0.2")
    with pytest.raises(LoginThrottledError) as throttled:
        await auth.login("alice", "alice-password", "10.0.0.2")  # even the right password must wait
    assert throttled.value.retry_after == 1
    assert (await auth.login("alice", "alice-password", "10.0.0.3"))[0].id == alice.id  # the owner elsewhere
    clock.advance(1)
    with pytest.raises(AuthenticationError):
        await auth.login("alice", "guess", "10.0.0.2")
    with pytest.raises(LoginThrottledError) as again:
        await auth.login("alice", "guess", "10.0.0.2")
    assert again.value.retry_after == 2  # the delay doubles
    clock.advance(2)
    assert (await auth.login("alice", "alice-password", "10.0.0.2"))[0].id == alice.id


async def test_a_successful_login_clears_the_pair(auth: Authenticator, alice: User) -> None:
    for _ in range(3):
        for _ in range(4):
            with pytest.raises(AuthenticationError):
                await auth.login("alice", "guess", "10.1.0.1")
        assert (await auth.login("alice", "alice-password", "10.1.0.1"))[0].id == alice.id


async def test_password_hashes_beyond_the_bound_are_refused_at_once(store: IdentityStore) -> None:
    auth = Authenticator(store, TOKENS, FAST, max_concurrent_hashes=1)
    await auth.create_user("alice", "alice-password", "user")
    first, second = await asyncio.gather(
        auth.login("alice", "alice-password", "c1"),
        auth.login("alice", "alice-password", "c2"),
        return_exceptions=True,
    )
    assert isinstance(first, tuple) and first[0].username == "alice"
    assert isinstance(second, LoginBusyError) and second.retry_after == 1
    assert auth.hash_gate.running == 0
    assert (await auth.login("alice", "alice-password", "c2"))[0].username == "alice"  # nothing counted


async def test_login_rehashes_when_the_parameters_rise(store: IdentityStore, clock: FakeClock) -> None:
    weak = Authenticator(store, TOKENS, FAST, clock=clock)
    user = await weak.create_user("carol", "carol-password", "user")
    assert user.password_hash is not None and parse_hash(user.password_hash)[0].n == 2**10
    stronger = Authenticator(store, TOKENS, ScryptParams(n=2**11), clock=clock)
    await stronger.login("carol", "carol-password", "c")
    rehashed = await store.get_user(user.id)
    assert rehashed is not None and rehashed.password_hash is not None
    assert rehashed.password_hash.startswith("scrypt$n=2048,r=8,p=1$")
    assert verify_password("carol-password", rehashed.password_hash)
    await weak.login("carol", "carol-password", "c")  # lower settings keep the stronger hash
    kept = await store.get_user(user.id)
    assert kept is not None and kept.password_hash == rehashed.password_hash


async def test_users_are_created_with_hashed_passwords(auth: Authenticator, alice: User) -> None:
    assert alice.password_hash is not None and "alice-password" not in alice.password_hash
    assert verify_password("alice-password", alice.password_hash)
    with pytest.raises(UserExistsError):
        await auth.create_user("alice", "another-password")
    with pytest.raises(ValueError, match="role"):
        await auth.create_user("mallory", "mallory-password", "superuser")


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _idp_token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    now = int(time.time())
    body = {"sub": "dave", "iat": now, "exp": now + 600, "iss": IDP, "aud": "pocketllm", **claims}
    return jwt.encode(body, key, algorithm="RS256")


async def test_external_tokens_map_to_local_users(
    store: IdentityStore, idp_key: rsa.RSAPrivateKey, alice: User
) -> None:
    provider = ExternalProvider(
        IDP, "pocketllm", public_key=_pem(idp_key), username_claim="preferred_username"
    )
    auth = Authenticator(store, TOKENS, FAST, provider)
    principal = await auth.authenticate(f"Bearer {_idp_token(idp_key, preferred_username='alice')}")
    assert principal.user_id == alice.id and principal.scopes == {"inference"}
    with pytest.raises(AuthenticationError, match="does not exist"):
        await auth.authenticate(f"Bearer {_idp_token(idp_key, preferred_username='newcomer')}")
    with pytest.raises(AuthenticationError, match="names no user"):
        await auth.authenticate(f"Bearer {_idp_token(idp_key)}")
    # an attacker's HS256 token claiming the provider's issuer, keyed with its public PEM
    now = int(time.time())
    forged = _forge_hs256(
        {
            "sub": "x",
            "preferred_username": "alice",
            "iat": now,
            "exp": now + 60,
            "iss": IDP,
            "aud": "pocketllm",
        },
        _pem(idp_key).encode(),
    )
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {forged}")


async def test_external_users_are_created_on_first_sight_when_configured(
    store: IdentityStore, idp_key: rsa.RSAPrivateKey
) -> None:
    provider = ExternalProvider(IDP, "pocketllm", public_key=_pem(idp_key), create_users=True)
    auth = Authenticator(store, TOKENS, FAST, provider)
    principal = await auth.authenticate(f"Bearer {_idp_token(idp_key)}")
    created = await store.get_user_by_name("dave")
    assert created is not None and created.id == principal.user_id
    assert created.role == "user" and created.password_hash is None
    assert (await auth.authenticate(f"Bearer {_idp_token(idp_key)}")).user_id == created.id
    with pytest.raises(AuthenticationError, match="invalid username or password"):
        await auth.login("dave", "", "c")  # no password login for external users


def test_the_external_issuer_must_differ_from_ours(tmp_path: Path, idp_key: rsa.RSAPrivateKey) -> None:
    provider = ExternalProvider(TOKENS.issuer, "pocketllm", public_key=_pem(idp_key))
    with pytest.raises(ValueError, match="issuer"):
        Authenticator(SQLiteStore.__new__(SQLiteStore), TOKENS, FAST, provider)
