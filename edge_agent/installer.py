"""The daemon's bundle installer: verify, load, download, smoke-test, fall back.

:class:`BundleInstaller` is a part of :class:`~edge_agent.daemon.AgentDaemon` (a mixin: its
methods run on the daemon and use the attributes it declares, set by the daemon's
``__init__``). Every bundle is verified (signatures against the trust store and policy,
then every file's digest) each time it is loaded, also from the device's own disk at
start; a download becomes a slot file only after it verified and passed its smoke test;
an installed bundle that no longer loads falls back to the previous one.

This module does not decide what to install: the reconcile driver in
:mod:`edge_agent.daemon` carries out the plan of :func:`edge_agent.reconcile.plan`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.download import Downloader, DownloadError
from edge_agent.errors import InstallError
from edge_agent.model import LoadedModel, LoadError
from edge_agent.slots import SlotError, Slots, State
from edgefleet.contract.bundle import Limits, unpack_verified
from edgefleet.contract.errors import BundleError
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.signing import Policy, TrustStore

__all__ = ["BundleInstaller"]

log = logging.getLogger("edge_agent.daemon")

_RETRY_MIN_S, _RETRY_MAX_S = 1.0, 60.0


class BundleInstaller:
    """The installer's half of the daemon (see the module docstring)."""

    # set by AgentDaemon.__init__
    config: AgentConfig
    agent: Agent
    slots: Slots
    trust: TrustStore
    policy: Policy
    limits: Limits
    downloader: Downloader
    _stop: threading.Event
    _newer: Callable[[int], bool]
    _commit: Callable[[State], None]
    _report: Callable[[str, int, BundleRef, str], None]

    def _load(self, path: Path, *, installed: BundleRef | None = None,
              allow_downgrade: bool = True) -> LoadedModel:
        """Verify the bundle file into a directory beside the slots, load it from there.

        Verification streams (memory stays flat whatever the file holds); onnxruntime then
        reads model.onnx from its verified file, and the directory goes once it has.
        """
        with unpack_verified(path, self.trust, self.policy, work_dir=self.slots.work_dir,
                             limits=self.limits, allow_downgrade=allow_downgrade,
                             installed_version=None if installed is None
                             else installed.version) as bundle:
            return LoadedModel(bundle, intra_op_threads=self.config.intra_op_threads,
                               max_rows=self.config.max_rows_per_call)

    def _load_installed(self) -> None:
        state = self.slots.state
        if self.slots.recovered:
            self._report("failed", state.revision, BundleRef("unknown", "0.0.0"),
                         self.slots.recovered)
        if state.active is not None:
            try:
                self.agent.activate(self._load(self.slots.file(state.active.sha256)))
            except (BundleError, LoadError, SlotError) as exc:
                reason = f"installed bundle {state.active.label} failed to load: {exc}"
                log.error("%s", reason)
                self._fall_back(state, reason)
        if self.slots.state.shadow is not None:
            shadow = self.slots.state.shadow
            try:
                self.agent.set_shadow(self._load(self.slots.file(shadow.sha256)))
            except (BundleError, LoadError, SlotError) as exc:
                log.error("shadow %s failed to load: %s", shadow.label, exc)
                self._commit(replace(self.slots.state, shadow=None))

    def _fall_back(self, state: State, reason: str) -> None:
        """The active bundle no longer loads (a corrupt disk, a revoked key): go back."""
        previous = state.previous
        if previous is not None:
            try:
                self.agent.activate(self._load(self.slots.file(previous.sha256)))
                self._commit(replace(state, active=previous, previous=None)
                             .with_failure(state.active.sha256, reason))
                self._report("rolled_back", state.revision, previous,
                             f"{reason}; back on {previous.label}")
                return
            except (BundleError, LoadError, SlotError) as exc:
                reason = f"{reason}; the previous {previous.label} failed too: {exc}"
        self._commit(replace(state, active=None, previous=None)
                     .with_failure(state.active.sha256, reason))
        self._report("failed", state.revision, state.active, reason)

    def _prepare(self, target: BundleRef, revision: int, *, download: bool,
                 installed: BundleRef | None = None,
                 allow_downgrade: bool = True) -> LoadedModel | None:
        """Get the bundle's file (download or slot), verify, load, smoke-test, keep.

        The downloaded file becomes the slot file by a rename, only after it verified and
        passed its smoke test; a failure removes it. None if superseded during download.

        Raises:
            DownloadError, BundleError, LoadError, SlotError, InstallError: the reason.
        """
        temp = None
        try:
            if download:
                fetched = self._fetch(target, revision)
                if fetched is None:
                    return None
                temp = path = fetched
            else:
                path = self.slots.file(target.sha256)
            model = self._load(path, installed=installed, allow_downgrade=allow_downgrade)
            problems = model.smoke_test()
            if problems:
                raise InstallError(f"smoke test failed: {'; '.join(problems)}")
            if temp is not None:
                self.slots.store(model.ref.sha256, temp=temp)
                temp = None
            return model
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)

    def _fetch(self, target: BundleRef, revision: int) -> Path | None:
        """Download with retries for transient failures; None if superseded meanwhile.

        Raises:
            DownloadError: a failure that retrying cannot fix (or the agent is stopping).
            SlotError: the disk refused the file.
        """
        delay = _RETRY_MIN_S
        while True:
            fd, temp = self.slots.temp_file()
            try:
                self.downloader.fetch(target.download_url, fd,
                                      sha256=target.sha256, size=target.size)
                return temp
            except DownloadError as exc:
                temp.unlink(missing_ok=True)
                if not exc.retryable or self._stop.is_set():
                    raise
                log.warning("download of %s failed (%s); retrying in %.0f s", target.label,
                            exc, delay)
            if self._stop.wait(delay) or self._newer(revision):
                return None
            delay = min(delay * 2, _RETRY_MAX_S)



def reason_of(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"

