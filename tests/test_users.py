"""Password checks of hub users: a log-in as a user who does not exist costs a full Argon2 verification,
as a wrong password does, so the time of the answer does not tell which names exist."""

from __future__ import annotations

import pytest
from argon2.exceptions import VerifyMismatchError

from bsscihub import users


def test_the_stand_in_for_a_missing_user_is_a_real_hash_with_the_hasher_s_parameters() -> None:
    # Same type, version, memory, time and parallelism as every stored hash: verifying costs the same.
    assert not users._hasher.check_needs_rehash(users._DUMMY_HASH)
    real = users.hash_password("correct horse 0123")
    assert users._DUMMY_HASH.split("$")[:4] == real.split("$")[:4]
    for password in ("", "correct horse 0123", users._DUMMY_HASH):
        # a mismatch found by computing the hash, not a malformed hash refused before any work
        with pytest.raises(VerifyMismatchError):
            users._hasher.verify(users._DUMMY_HASH, password)
        assert users.verify_password(users._DUMMY_HASH, password) is False
