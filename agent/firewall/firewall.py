"""`Firewall`: the agent's own nftables table `inet starling`, fail closed, updated atomically,
repaired when someone else changes it.

Life cycle (the daemon drives it; every method is synchronous and thread-safe, run it through
`asyncio.to_thread`):

    fw = Firewall("wt0", on_drift=audit)      # mode="disabled" installs nothing
    fw.install_guard()                        # before the interface carries traffic: drop all
    fw.apply(map["firewall"], map["forward"]) # validate, then one transaction (a diff)
    fw.check_drift()                          # every second: repair within the next call
    fw.remove()                               # `starling down`

`forward` is the map's list of routes this peer forwards (`ForwardEntry`, empty on a peer that
routes nothing): its masquerade rules go into the same transaction as the firewall rules, and a
`forward` firewall rule for a route not in it rejects the map.

Only our table is ever touched. A map that does not validate is rejected whole and nothing
changes; an update nft refuses leaves the previous ruleset (or the guard) in place; in both cases
`status()` says why and the caller retries with the next map.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.firewall.model import FAMILY, TABLE, CompiledRuleset, FirewallError, compile_firewall, guard_ruleset
from agent.firewall.nft import Monitor, Nft
from agent.firewall.nftjson import Plan, delete_table, diff, full_build
from agent.firewall.state import parse_listing, problems
from agent.status import DriftEvent, FirewallStatus
from starling_proto.firewall import FirewallSection
from starling_proto.routes import ForwardEntry

Forward = Sequence[ForwardEntry] | Sequence[Mapping[str, object]]

log = logging.getLogger("starling.agent.firewall")
Mode = Literal["enforce", "disabled"]
DISABLED_MESSAGE = "firewall disabled by operator"
TABLE_NAME = f"{FAMILY} {TABLE}"


@dataclass(frozen=True)
class ApplyResult:
    """What one `apply()` did. `changed` is False when the map asked for what was already installed."""

    changed: bool
    full_rebuild: bool
    sets_added: int
    sets_removed: int
    elements_added: int
    elements_removed: int
    chains_rebuilt: tuple[str, ...]
    rules: int
    sets: int
    elements: int
    duration_ms: float
    applied: bool = True  # False in disabled mode: validated only


def _result(plan: Plan, model: CompiledRuleset, started: float, *, applied: bool = True) -> ApplyResult:
    return ApplyResult(
        changed=not plan.empty,
        full_rebuild=plan.full,
        sets_added=plan.sets_added,
        sets_removed=plan.sets_removed,
        elements_added=plan.elements_added,
        elements_removed=plan.elements_removed,
        chains_rebuilt=plan.chains_rebuilt,
        rules=model.rule_count,
        sets=len(model.sets),
        elements=model.element_count,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        applied=applied,
    )


class Firewall:
    BACKSTOP = 30.0  # seconds between full listings while `nft monitor` reports nothing

    def __init__(
        self,
        interface: str,
        *,
        mode: Mode = "enforce",
        nft: str | Sequence[str] = "nft",
        on_drift: Callable[[str], None] | None = None,
        monitor: bool = True,
        timeout: float = 10.0,
    ) -> None:
        if mode not in ("enforce", "disabled"):
            raise FirewallError(f"firewall mode {mode!r} must be enforce or disabled")
        self.interface = guard_ruleset(interface).interface
        self.mode: Mode = mode
        self.on_drift = on_drift
        self._nft = Nft(nft, timeout=timeout)
        self._monitor = Monitor(self._nft) if monitor and mode == "enforce" else None
        self._lock = threading.RLock()
        self._applied: CompiledRuleset | None = None  # what the kernel holds (guard or ruleset)
        self._wanted: CompiledRuleset | None = None  # the last valid map (also in disabled mode)
        self._state = "disabled" if mode == "disabled" else "absent"
        self._last_error: str | None = None
        self._error_source = ""  # map | apply | guard | repair | remove
        self._last_apply_ms: float | None = None
        self._last_full_check = float("-inf")
        self._drift_repairs = 0
        self._last_drift: DriftEvent | None = None

    # ----- public API ------------------------------------------------------------------------
    def install_guard(self) -> None:
        """Install the fail-closed baseline (all mesh traffic dropped) unless a ruleset is enforced.

        Idempotent: once this instance installed anything it does nothing (drift repair keeps the
        table). It replaces any `inet starling` table a previous run left behind. In disabled mode
        it removes such a leftover instead, so that switching the mode takes effect."""
        with self._lock:
            if self.mode == "disabled":
                try:
                    self._nft.apply(delete_table())
                except FirewallError as exc:
                    log.debug("no leftover firewall table removed: %s", exc)
                return
            if self._applied is not None:
                return
            try:
                self._commit(full_build(guard_ruleset(self.interface)), guard_ruleset(self.interface))
            except FirewallError as exc:
                self._fail("guard", f"cannot install the guard ruleset: {exc}")
                raise FirewallError(self._last_error or str(exc)) from exc
            self._state, self._last_error = "guard", None
            self._start_monitor()

    def validate(self, firewall: FirewallSection | Mapping[str, object], forward: Forward = ()) -> CompiledRuleset:
        """Check and compile a map's firewall section and forward list; raises `FirewallError`,
        applies nothing."""
        return compile_firewall(firewall, self.interface, forward)

    def apply(self, firewall: FirewallSection | Mapping[str, object], forward: Forward = ()) -> ApplyResult:
        """Validate, then apply the difference from what is installed in one transaction.

        `forward`: the map's `forward` list (routes this peer forwards; `ForwardEntry`s or their wire
        form); its masquerade rules are part of the same transaction. Pass it with every map: an
        apply without it removes them.

        On any error nothing changes (the previous ruleset or the guard stays) and `FirewallError`
        says why; call again with the same or a newer map to retry."""
        started = time.perf_counter()
        with self._lock:
            try:
                model = self.validate(firewall, forward)
            except FirewallError as exc:
                self._fail("map", f"map rejected, nothing applied: {exc}")
                raise
            self._wanted = model
            if self.mode == "disabled":
                return _result(Plan(), model, started, applied=False)
            try:
                if self._applied is None:
                    self.install_guard()  # fail closed first: the real apply may still fail
                plan = self._apply_model(model)
            except FirewallError as exc:
                self._fail("apply", f"update failed, {self._installed_text()}: {exc}")
                raise FirewallError(self._last_error or str(exc)) from exc
            self._state, self._last_error = "enforcing", None
            result = _result(plan, model, started)
            self._last_apply_ms = result.duration_ms
            return result

    def check_drift(self) -> bool:
        """Compare our table with what we installed; repair it when it differs.

        Returns True when drift was found and repaired (after calling `on_drift(description)`).
        Raises `FirewallError` when the repair failed (mesh traffic keeps whatever the kernel
        holds; the next call tries again). Cheap while `nft monitor` reports no foreign change."""
        if self.mode == "disabled":
            return False
        with self._lock:
            model = self._applied
            if model is None:
                return False
            if not self._needs_listing():
                return False
            self._last_full_check = time.monotonic()
            found = self._problems(model)
            if not found:
                return False
            description = f"table {TABLE_NAME} changed outside Starling: " + "; ".join(found) + "; restored"
            try:
                self._commit(full_build(model), model)
                after = self._problems(model)  # a repair that does not hold must not loop silently
                if after:
                    raise FirewallError("the rebuilt table still differs: " + "; ".join(after))
            except FirewallError as exc:
                self._last_full_check = float("-inf")  # list again on the next call, whatever the monitor says
                self._fail("repair", f"drift found ({'; '.join(found)}) but the repair failed: {exc}")
                raise FirewallError(self._last_error or str(exc)) from exc
            if self._state == "error" and self._error_source == "repair":
                self._state, self._last_error = ("guard" if model.guard else "enforcing"), None
            self._report_drift(description)
            return True

    def remove(self) -> None:
        """Delete our table (and stop the monitor). Mesh traffic is then unfiltered by Starling."""
        with self._lock:
            if self._monitor is not None:
                self._monitor.stop()
            try:
                self._nft.apply(delete_table())
            except FirewallError as exc:
                if self.mode == "enforce":
                    self._fail("remove", f"cannot remove the firewall table: {exc}")
                    raise
            self._applied = None
            if self.mode == "enforce":
                self._state, self._last_error = "absent", None

    def close(self) -> None:
        """Stop the monitor subprocess, leave the table in place (the daemon is exiting)."""
        if self._monitor is not None:
            self._monitor.stop()

    def status(self) -> FirewallStatus:
        """A snapshot of the state; lock-free, so the daemon's event loop never waits on nft."""
        model = self._applied if self.mode == "enforce" else self._wanted
        enforced = model is not None and not model.guard
        return {
            "mode": self.mode,
            "state": self._state,
            "message": self._message(),
            "interface": self.interface,
            "installed": None if self._applied is None else ("guard" if self._applied.guard else "ruleset"),
            "last_error": self._last_error,
            "rules": model.rule_count if model and enforced else 0,
            "sets": len(model.sets) if model and enforced else 0,
            "elements": model.element_count if model and enforced else 0,
            "route_rules": model.route_count if model and enforced else 0,
            "masquerade": list(model.masqueraded) if model and enforced else [],
            "last_apply_ms": self._last_apply_ms,
            "drift_repairs": self._drift_repairs,
            "last_drift": self._last_drift,
            "drift_detection": self._detection(),
        }

    def render(self) -> str:
        """The installed (or, disabled, the wanted) ruleset as nft text, for `starling status -v`."""
        model = self._applied or self._wanted
        return model.render_text() if model is not None else ""

    # ----- internals -------------------------------------------------------------------------
    def _apply_model(self, model: CompiledRuleset) -> Plan:
        if self._state == "error" and self._error_source == "repair":
            plan = full_build(model)  # the kernel holds something unknown: no diff against it
        else:
            plan = diff(self._applied, model)
        if plan.empty:
            return plan
        try:
            self._commit(plan, model)
            return plan
        except FirewallError as exc:
            if plan.full:
                raise
            log.warning("incremental firewall update failed (%s); rebuilding the table", exc)
        drift = self._describe_drift()
        full = full_build(model)
        self._commit(full, model)
        if drift:
            self._report_drift(f"table {TABLE_NAME} changed outside Starling: {drift}; restored")
        return full

    def _commit(self, plan: Plan, model: CompiledRuleset) -> None:
        """Run one transaction. It is atomic: on failure the kernel keeps what it had."""
        self._nft.apply(plan.commands)
        self._applied = model

    def _problems(self, model: CompiledRuleset) -> list[str]:
        listing = self._nft.list_table()
        return problems(None if listing is None else parse_listing(listing), model)

    def _describe_drift(self) -> str:
        if self._applied is None:
            return ""
        try:
            return "; ".join(self._problems(self._applied))
        except FirewallError:
            return ""

    def _needs_listing(self) -> bool:
        monitor = self._monitor
        if monitor is None:
            return True
        if not monitor.alive:
            self._start_monitor()
            return True
        dirty = monitor.take_dirty()
        return dirty or not monitor.trusted or time.monotonic() - self._last_full_check >= self.BACKSTOP

    def _start_monitor(self) -> None:
        if self._monitor is not None and not self._monitor.alive:
            self._monitor.start()

    def _report_drift(self, description: str) -> None:
        self._drift_repairs += 1
        self._last_drift = {"time": time.time(), "description": description}
        log.warning("%s", description)
        if self.on_drift is not None:
            try:
                self.on_drift(description)
            except Exception:  # the audit hook must never break enforcement
                log.exception("firewall drift callback failed")

    def _fail(self, source: str, message: str) -> None:
        self._state, self._last_error, self._error_source = "error", message, source
        log.error("%s", message)

    def _installed_text(self) -> str:
        if self._applied is None:
            return "no Starling table is installed (mesh traffic is NOT filtered by Starling)"
        if self._applied.guard:
            return "the guard (all mesh traffic dropped) stays active"
        return "the previous ruleset stays active"

    def _message(self) -> str:
        if self.mode == "disabled":
            return DISABLED_MESSAGE
        if self._state == "error":
            return f"error: {self._last_error}"
        if self._state == "absent":
            return "no firewall table installed"
        if self._state == "guard" or self._applied is None or self._applied.guard:
            return f"guard: all traffic on {self.interface} dropped until the first map is applied"
        model = self._applied
        parts = [f"{model.route_count} toward routes"] if model.route_count else []
        parts += [f"{len(model.rules_fwd)} forwarded"] if model.rules_fwd else []
        parts += [f"masquerading {', '.join(model.masqueraded)}"] if model.masqueraded else []
        routes = f" ({', '.join(parts)})" if parts else ""
        return (
            f"enforcing {model.rule_count} rules{routes} over {len(model.sets)} sets "
            f"({model.element_count} addresses) on {self.interface}"
        )

    def _detection(self) -> str:
        if self.mode == "disabled" or self._applied is None:
            return "off"
        if self._monitor is not None and self._monitor.alive:
            return "nft monitor"
        return "polling"
