"""The layer claim protocol (dkr.claims), one transition at a time, with real flocks.

Each test drives a claim (or the run's table of claims) through one
transition and checks the state it reaches, what the lock file's flock
says (read from /proc/locks, as another process would see it), and what
those who wait for the layer are told.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys

import pytest
from reliability_helpers import flock_holders

from dkr.pull.claims import ClaimError, ClaimState, ClaimTable, LayerClaim
from dkr.errors import DkrError
from dkr.store.locks import AsyncFlock


@pytest.fixture
def locks(tmp_path):
    path = tmp_path / "locks"
    path.mkdir()
    return path


def lock(locks, key="k"):
    return AsyncFlock(locks / f"layer-{key}.lock", f"building layer {key}")


def held(locks, key="k") -> bool:
    return os.getpid() in flock_holders(locks / f"layer-{key}.lock")


class HeldElsewhere:
    """Layer ``key``'s lock, held as another process's descriptor would hold it,
    until ``release()`` (the holder is done) or the end of the ``with``."""

    def __init__(self, locks, key="k"):
        self.fd = os.open(locks / f"layer-{key}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "HeldElsewhere":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run(coroutine):
    return asyncio.run(coroutine)


def absent():
    return None


# --- NEW → WAITING → OWNED | DONE | FAILED ------------------------------------------------

def test_acquire_a_missing_layer_owns_it_and_holds_its_lock(locks):
    async def main():
        claim = LayerClaim("k", lock(locks))
        assert claim.state is ClaimState.NEW and not claim.settled.done()
        assert await claim.acquire(absent) is True
        assert claim.state is ClaimState.OWNED and claim.builds and claim.settled.done()
        assert held(locks) and not claim.future.done() and not claim.tree.done()
    run(main())


def test_acquire_a_committed_layer_is_done_at_once_and_lets_the_lock_go(locks, tmp_path):
    async def main():
        claim = LayerClaim("k", lock(locks))
        assert await claim.acquire(lambda: tmp_path / ".dkr-k") is False
        assert claim.state is ClaimState.DONE and not claim.builds and claim.settled.done()
        assert claim.future.result() == tmp_path / ".dkr-k"
        assert claim.tree.result().path == tmp_path / ".dkr-k"
        assert not held(locks)
    run(main())


def test_acquire_fails_with_what_the_look_for_the_layer_raised(locks):
    def wrong_backend():
        raise DkrError("made by backend btrfs")

    async def main():
        claim = LayerClaim("k", lock(locks))
        with pytest.raises(DkrError):
            await claim.acquire(wrong_backend)
        assert claim.state is ClaimState.FAILED and claim.settled.done() and not held(locks)
        assert str(claim.future.exception()) == "made by backend btrfs"
    run(main())


def test_acquire_waits_while_another_process_holds_the_lock_and_takes_over_when_it_dies(locks):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(600)"), str(locks / "layer-k.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"

        async def main():
            claim = LayerClaim("k", lock(locks))
            acquiring = asyncio.ensure_future(claim.acquire(absent))
            await asyncio.sleep(0.5)
            assert claim.state is ClaimState.WAITING and not claim.settled.done()
            holder.kill()                     # dies holding it: the kernel lets it go
            assert await asyncio.wait_for(acquiring, 10) is True
            assert claim.state is ClaimState.OWNED and held(locks)
        run(main())
    finally:
        holder.kill()
        holder.wait()


def test_a_wait_for_the_lock_that_is_cancelled_fails_the_claim(locks):
    with HeldElsewhere(locks):
        async def main():
            claim = LayerClaim("k", lock(locks))
            acquiring = asyncio.ensure_future(claim.acquire(absent))
            await asyncio.sleep(0.3)
            acquiring.cancel()
            with pytest.raises(asyncio.CancelledError):
                await acquiring
            assert claim.state is ClaimState.FAILED and claim.settled.done()
            assert isinstance(claim.future.exception(), DkrError)
        run(main())


# --- OWNED → EXTRACTED → DONE -----------------------------------------------------------

def test_extracted_gives_children_the_tree_and_commit_makes_it_visible(locks, tmp_path):
    tmp, final = tmp_path / ".dkr-k.tmp-1", tmp_path / ".dkr-k"
    tmp.mkdir()

    async def main():
        claim = LayerClaim("k", lock(locks))
        await claim.acquire(absent)
        tree = claim.extracted(tmp)
        assert claim.state is ClaimState.EXTRACTED and claim.builds
        assert claim.tree.result() is tree and tree.path == tmp
        assert not claim.future.done() and held(locks)
        claim.commit(final, os.rename)
        assert claim.state is ClaimState.DONE and not claim.builds
        assert claim.future.result() == final and tree.path == final      # children follow it
        assert final.is_dir() and not tmp.exists() and not held(locks)
    run(main())


def test_a_commit_whose_rename_fails_stays_extracted(locks, tmp_path):
    async def main():
        claim = LayerClaim("k", lock(locks))
        await claim.acquire(absent)
        claim.extracted(tmp_path / "gone")
        with pytest.raises(FileNotFoundError):
            claim.commit(tmp_path / ".dkr-k", os.rename)
        assert claim.state is ClaimState.EXTRACTED and held(locks)
    run(main())


REFUSED = [("new", "extracted"), ("new", "commit"),
           ("owned", "commit"), ("owned", "acquire"),
           ("extracted", "extracted"), ("extracted", "acquire"),
           ("done", "extracted"), ("done", "commit"), ("done", "acquire"),
           ("failed", "extracted"), ("failed", "commit"), ("failed", "acquire")]


@pytest.mark.parametrize("state, transition", REFUSED)
def test_transitions_out_of_order_are_refused(locks, tmp_path, state, transition):
    async def main():
        claim = LayerClaim("k", lock(locks))
        if state != "new":
            await claim.acquire((lambda: tmp_path) if state == "done" else absent)
        if state == "extracted":
            claim.extracted(tmp_path)
        if state == "failed":
            claim.fail()
        before = claim.state
        with pytest.raises(ClaimError):
            if transition == "acquire":
                await claim.acquire(absent)
            else:
                extra = (os.rename,) if transition == "commit" else ()
                getattr(claim, transition)(tmp_path / "x", *extra)
        assert claim.state is before
    run(main())


# --- → FAILED ------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [ClaimState.NEW, ClaimState.OWNED, ClaimState.EXTRACTED])
def test_fail_lets_the_lock_go_and_tells_the_waiters(locks, tmp_path, state):
    async def main():
        claim = LayerClaim("k", lock(locks))
        if state is not ClaimState.NEW:
            await claim.acquire(absent)
        if state is ClaimState.EXTRACTED:
            claim.extracted(tmp_path)
        claim.fail(DkrError("download failed"))
        assert claim.state is ClaimState.FAILED and claim.settled.done() and not held(locks)
        assert str(claim.future.exception()) == "download failed"
        if state is not ClaimState.EXTRACTED:
            assert str(claim.tree.exception()) == "download failed"
        claim.fail(DkrError("again"))             # nothing more to do
        assert str(claim.future.exception()) == "download failed"
    run(main())


def test_fail_without_an_error_of_its_own_says_the_layer_was_not_built(locks):
    async def main():
        claim = LayerClaim("k", lock(locks))
        await claim.acquire(absent)
        claim.fail(asyncio.CancelledError())
        assert "was not built" in str(claim.future.exception())
    run(main())


def test_fail_after_done_changes_nothing(locks, tmp_path):
    async def main():
        claim = LayerClaim("k", lock(locks))
        await claim.acquire(lambda: tmp_path)
        claim.fail(DkrError("late"))
        assert claim.state is ClaimState.DONE and claim.future.result() == tmp_path
    run(main())


# --- the run's table: joining, and the lock order ---------------------------------------------

def test_an_image_joins_a_claim_only_once_it_is_settled(locks):
    """The deadlock rule: whoever joins a claim that waits for its lock waits too,
    and so takes no lock of a layer above it meanwhile."""
    with HeldElsewhere(locks) as other:
        async def main():
            table = ClaimTable(lambda key: lock(locks, key))
            first = asyncio.ensure_future(table.claim("k", absent))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(table.claim("k", absent))
            await asyncio.sleep(0.3)
            assert not first.done() and not second.done()
            other.release()                   # the other process is done with it
            mine, joined = await asyncio.wait_for(asyncio.gather(first, second), 10)
            assert mine.mine and mine.builds and not joined.mine and not joined.builds
            assert joined.claim is mine.claim and mine.claim.sharers == 1
        run(main())


def test_a_claim_given_up_before_it_is_settled_is_taken_over(locks):
    with HeldElsewhere(locks) as other:
        async def main():
            table = ClaimTable(lambda key: lock(locks, key))
            first = asyncio.ensure_future(table.claim("k", absent))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(table.claim("k", absent))
            await asyncio.sleep(0.3)
            first.cancel()                    # the image that made the claim stops
            await asyncio.sleep(0.05)
            assert not second.done()          # it makes its own claim, and waits for the lock
            other.release()
            share = await asyncio.wait_for(second, 10)
            assert share.mine and share.builds and held(locks)
        run(main())


def test_an_abandoned_claim_is_made_anew_by_the_next_image(locks):
    async def main():
        table = ClaimTable(lambda key: lock(locks, key))
        first = await table.claim("k", absent)
        table.abandon(first.claim, DkrError("no"))
        assert first.claim.state is ClaimState.FAILED and not held(locks)
        again = await table.claim("k", absent)
        assert again.mine and again.claim is not first.claim and held(locks)
    run(main())


def test_a_done_claim_is_joined_and_abandoning_it_keeps_it(locks, tmp_path):
    async def main():
        table = ClaimTable(lambda key: lock(locks, key))
        first = await table.claim("k", lambda: tmp_path)
        table.abandon(first.claim)
        joined = await table.claim("k", absent)
        assert not joined.mine and joined.claim is first.claim
        assert joined.future.result() == tmp_path
    run(main())


def test_forget_lets_no_image_join_any_more(locks):
    async def main():
        table = ClaimTable(lambda key: lock(locks, key))
        first = await table.claim("k", absent)
        table.forget(first.claim)
        assert first.claim not in table
        table.abandon(first.claim)
        assert (await table.claim("k", absent)).claim is not first.claim
    run(main())
