"""Layer claims: which process, and which image of a run, builds a layer.

A layer is built under its flock (``locks/layer-<key>.lock``) so that two
processes on one image root build it once; within one run, images that need
the same layer share one ``LayerClaim``. A claim is a small state machine:

    NEW ─acquire─► WAITING ─┬─(locked, missing)─► OWNED ─extracted─► EXTRACTED
                            │                                              │ commit
                            └─(locked, found)─────────────────────────────►└─► DONE
    NEW, WAITING, OWNED, EXTRACTED ─fail─► FAILED (lock released, waiters told)

Lock order. Layers are claimed base first, and a layer's lock is taken only
by a process that holds, or has found committed, every layer below it. So
two processes never wait for each other's locks: whoever holds a layer's
lock holds, or has no more need of, the locks below it. This is why an image
that needs a layer another image of its run has claimed waits until that
claim is *settled* (its lock held, or the layer found) before it claims
anything above it: joining a claim that still waits for its lock, and
taking the lock of the layer above at once, held a child's lock while the
parent's was still to be had, and a process that then took the parent's
lock waited for the child's, for ever (each waiting for the other).
Whatever else takes more than one layer lock at a time must keep this order.

A holder that dies loses its flock with its last descriptor (its helpers
die with it and hold none): a waiter then takes the lock and finds the
layer missing, and builds it. An image of this run that gives up its claim
before it is settled (it stopped, or failed) lets a waiting image take the
claim over the same way.
"""

from __future__ import annotations

import asyncio
import enum
from pathlib import Path
from typing import Callable

from dkr.errors import DkrError
from dkr.store.locks import AsyncFlock
from dkr.tasks import retrieved


class LayerTree:
    """A layer's complete tree, wherever it is: under its temp name while it is
    sealed (child layers are copied from it then), under its final name after.

    A child copied after its parent was committed (in a batch, an image that
    comes late to a shared base) must not look for the temp name.
    """

    def __init__(self, path: Path):
        self.path = path

    def commit(self, final: Path, move: Callable[[Path, Path], None]) -> None:
        """``move(path, final)`` is the backend's commit of the tree to ``final``."""
        move(self.path, final)
        self.path = final


class ClaimState(enum.Enum):
    NEW = "new"
    WAITING = "waiting"        # for the layer's lock: another process may be building it
    OWNED = "owned"            # lock held, layer not there: ours to build
    EXTRACTED = "extracted"    # its tree is complete and checked: children may copy it
    DONE = "done"              # committed (by us, or found so): ``future`` has its path
    FAILED = "failed"          # given up: its lock is released, its waiters told


SETTLED = (ClaimState.OWNED, ClaimState.EXTRACTED, ClaimState.DONE, ClaimState.FAILED)


class ClaimError(RuntimeError):
    """A transition asked of a claim in a state that has none: a bug in the caller."""


class LayerClaim:
    """One run's claim on one layer (see the module's docstring for the states).

    ``tree`` gives the layer's LayerTree as soon as it is extracted (a child
    layer may be copied from it then); ``future`` gives its final path once
    it is committed; ``settled`` is done once the claim left WAITING (or
    never got there). ``sharers`` counts the other images of the run that
    joined it.
    """

    def __init__(self, key: str, lock: AsyncFlock):
        loop = asyncio.get_running_loop()
        self.key = key
        self.lock = lock
        self.state = ClaimState.NEW
        self.future: asyncio.Future = loop.create_future()
        self.tree: asyncio.Future = loop.create_future()
        self.settled: asyncio.Future = loop.create_future()
        self.sharers = 0
        for future in (self.future, self.tree):
            future.add_done_callback(retrieved)      # its error reaches waiters elsewhere

    def __repr__(self) -> str:
        return f"<LayerClaim {self.key[:12]} {self.state.value}>"

    @property
    def builds(self) -> bool:
        """Whether this run builds the layer (it holds the lock for that)."""
        return self.state in (ClaimState.OWNED, ClaimState.EXTRACTED)

    # --- transitions ---------------------------------------------------------------
    async def acquire(self, found: Callable[[], Path | None]) -> bool:
        """NEW → WAITING → OWNED (True), or DONE (False) if ``found()`` under the lock
        names the committed layer. ``found`` may raise (a layer of another backend):
        the claim fails with that."""
        self._expect(ClaimState.NEW)
        self.state = ClaimState.WAITING
        try:
            await self.lock.acquire()
            final = found()
        except BaseException as e:
            self.fail(e)
            raise
        if final is None:
            self.state = ClaimState.OWNED
            self._settle()
            return True
        self.lock.release()
        self.tree.set_result(LayerTree(final))
        self._done(final)
        return False

    def extracted(self, path: Path) -> LayerTree:
        """OWNED → EXTRACTED: the tree at ``path`` is complete and checked."""
        self._expect(ClaimState.OWNED)
        tree = LayerTree(path)
        self.state = ClaimState.EXTRACTED
        self.tree.set_result(tree)
        return tree

    def commit(self, final: Path, move: Callable[[Path, Path], None]) -> None:
        """EXTRACTED → DONE: ``move`` (the backend's commit) gives the tree its final
        name, which makes it visible; the lock goes. (If ``move`` fails, the claim
        stays EXTRACTED.)"""
        self._expect(ClaimState.EXTRACTED)
        self.tree.result().commit(final, move)
        self.lock.release()
        self._done(final)

    def fail(self, error: BaseException | None = None) -> None:
        """Any state but DONE → FAILED: the lock goes, and whoever waits for the
        layer is told. ``error`` (an Exception) is what they see."""
        if self.state in (ClaimState.DONE, ClaimState.FAILED):
            return
        self.state = ClaimState.FAILED
        self.lock.release()
        failure = error if isinstance(error, Exception) else \
            DkrError(f"layer {self.key[:12]} was not built (an earlier step failed)")
        for future in (self.future, self.tree):
            if not future.done():
                future.set_exception(failure)
        self._settle()

    # --- --------------------------------------------------------------------------------
    def _done(self, final: Path) -> None:
        self.state = ClaimState.DONE
        self.future.set_result(final)
        self._settle()

    def _settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    def _expect(self, state: ClaimState) -> None:
        if self.state is not state:
            raise ClaimError(f"{self!r}: expected {state.value}")


class Share:
    """An image's part in a claim: ``mine`` if the image made it (and decides how it
    ends), else it joined another image's claim and waits for that build."""

    def __init__(self, claim: LayerClaim, mine: bool):
        self.claim = claim
        self.mine = mine

    def __repr__(self) -> str:
        return f"<Share {'mine' if self.mine else 'joined'} {self.claim!r}>"

    @property
    def key(self) -> str:
        return self.claim.key

    @property
    def builds(self) -> bool:
        """This image builds the layer."""
        return self.mine and self.claim.builds

    @property
    def future(self) -> asyncio.Future:
        return self.claim.future

    @property
    def tree(self) -> asyncio.Future:
        return self.claim.tree


class ClaimTable:
    """The claims of one run, by layer key: images needing one layer share a claim."""

    def __init__(self, lock_for: Callable[[str], AsyncFlock]):
        self._lock_for = lock_for
        self._claims: dict[str, LayerClaim] = {}

    def __contains__(self, claim: LayerClaim) -> bool:
        return self._claims.get(claim.key) is claim

    async def claim(self, key: str, found: Callable[[], Path | None]) -> Share:
        """Claim layer ``key`` for an image: make the claim, or join the run's.

        Joining waits until the claim is settled (see the lock order in the
        module's docstring); a claim given up before that is taken over.
        """
        while True:
            claim = self._claims.get(key)
            if claim is not None and claim.state is ClaimState.FAILED:
                self.forget(claim)
                claim = None
            if claim is None:
                claim = LayerClaim(key, self._lock_for(key))
                self._claims[key] = claim
                try:
                    await claim.acquire(found)
                finally:
                    if claim.state is ClaimState.FAILED:
                        self.forget(claim)
                return Share(claim, mine=True)
            await asyncio.shield(claim.settled)    # (a cancel stops our wait only)
            if claim.state is not ClaimState.FAILED:
                claim.sharers += 1
                return Share(claim, mine=False)
            # Its maker gave it up: we make the claim ourselves (and find out why).

    def forget(self, claim: LayerClaim) -> None:
        """No image of the run joins ``claim`` from now on."""
        if self._claims.get(claim.key) is claim:
            del self._claims[claim.key]

    def abandon(self, claim: LayerClaim, error: BaseException | None = None) -> None:
        """Its maker lets ``claim`` go: unless it is done, it fails, and the next image
        that needs the layer makes a new claim."""
        if claim.state is not ClaimState.DONE:
            self.forget(claim)
        claim.fail(error)
