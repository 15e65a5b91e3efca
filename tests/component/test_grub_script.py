"""The shipped GRUB snippet (hw/scripts/grub.cfg) in the real GRUB 2.06 script
interpreter (grub-emu), on a grubenv our backend wrote, read back after each
"boot" with our reader and with grub-editenv. Each boot is one power-on that
ends as the chosen menuentry runs (where a real board would start Linux); a
boot the agent does not follow up on is a power cut."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.bootloader.grub import MAX_TRIES, GrubEnv
from hw.bootloader.grubenv import EnvBlock
from hw.bootloader.model import (
    BootState,
    SlotBoot,
    SlotBootState,
    choose,
    mark_bad,
    mark_good,
    set_primary,
)
from tests.component._grubemu import BootResult, GrubEmuMachine, editenv_list, needs_grub_emu

pytestmark = needs_grub_emu

AB = ("A", "B")
GOOD = SlotBoot(SlotBootState.GOOD)
BAD = SlotBoot(SlotBootState.BAD)


def trial(n: int) -> SlotBoot:
    return SlotBoot(SlotBootState.TRIAL, n)


class Device:
    """grub-emu machine + the agent's side: our GrubEnv on a copy of the ESP's grubenv."""

    def __init__(self, workdir: Path, bootnames: tuple[str, ...] = AB) -> None:
        self.machine = GrubEmuMachine(workdir / "machine", bootnames)
        self.local = workdir / "agent-grubenv"
        self.env = GrubEnv(self.local, bootnames)
        self.env.create()
        self.machine.write_env(self.local.read_bytes())

    def agent(self, change: Callable[[BootState], BootState]) -> None:
        """The agent changes the state between boots (read-modify-write through GrubEnv)."""
        self.local.write_bytes(self.machine.read_env())
        self.env.store(change(self.env.load()))
        self.machine.write_env(self.local.read_bytes())

    def put(self, state: BootState) -> None:
        self.agent(lambda _: state)

    def state(self) -> BootState:
        self.local.write_bytes(self.machine.read_env())
        state = self.env.load()
        # grub-editenv reads the block GRUB saved the same way we do
        assert editenv_list(self.local) == EnvBlock.parse(self.local.read_bytes()).as_dict()
        return state

    def boot(self) -> BootResult:
        result = self.machine.boot()
        assert result.cmdline == f"ota.slot={result.slot} rauc.slot={result.slot}"
        return result


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_trial_that_is_committed_stays_booted(device: Device) -> None:
    device.agent(lambda s: set_primary(s, "B", 3))
    first = device.boot()
    assert (first.slot, first.trial) == ("B", True)
    assert device.state().slots["B"] == trial(2)
    device.agent(lambda s: mark_good(s, "B"))
    committed = device.machine.read_env()
    for _ in range(3):
        again = device.boot()
        assert (again.slot, again.trial, again.reason) == ("B", False, "committed slot")
    assert device.machine.read_env() == committed
    assert device.state() == BootState(order=("B", "A"), slots={"A": GOOD, "B": GOOD}, last_good="B")


@pytest.mark.parametrize("tries", [1, 3])
def test_trial_never_committed_falls_back_after_its_tries(device: Device, tries: int) -> None:
    device.agent(lambda s: set_primary(s, "B", tries))
    for left in reversed(range(tries)):
        result = device.boot()
        assert (result.slot, result.trial) == ("B", True)
        assert device.state().slots["B"] == trial(left)
    for _ in range(2):
        result = device.boot()
        assert (result.slot, result.trial) == ("A", False)
    final = device.state()
    assert final.slots == {"A": GOOD, "B": trial(0)}
    assert editenv_list(device.local)["B_TRY"] == "1"  # RAUC's tools also see B as not good


def test_ten_power_cuts_on_a_committed_system_change_nothing(device: Device) -> None:
    device.agent(lambda s: mark_good(set_primary(s, "B", 3), "B"))
    before = device.machine.read_env()
    for _ in range(10):
        assert device.boot().slot == "B"
    assert device.machine.read_env() == before, "a committed boot must not write the env at all"


def test_power_cuts_during_a_trial_only_spend_that_trial(device: Device) -> None:
    device.agent(lambda s: set_primary(s, "B", 2))
    slots = [device.boot().slot for _ in range(10)]
    assert slots == ["B", "B"] + ["A"] * 8
    assert device.state().slots == {"A": GOOD, "B": trial(0)}


def test_all_counters_at_zero_boot_the_last_good_slot_instead_of_looping(device: Device) -> None:
    device.put(BootState(order=("B", "A"), slots={"A": trial(0), "B": trial(0)}, last_good="A"))
    before = device.machine.read_env()
    for _ in range(3):
        result = device.boot()
        assert (result.slot, result.trial) == ("A", False)
        assert result.reason == "no bootable slot in order; last committed slot"
    assert device.machine.read_env() == before


def test_nothing_bootable_and_nothing_committed_boots_first_in_order(device: Device) -> None:
    device.put(BootState(order=("B", "A"), slots={"A": BAD, "B": trial(0)}, last_good=None))
    assert device.boot().slot == "B"


def test_bad_slot_is_skipped(device: Device) -> None:
    device.agent(lambda s: mark_bad(s, "A"))
    assert device.boot().slot == "B"


def test_trial_is_not_booted_when_its_counter_cannot_be_saved(device: Device) -> None:
    # GRUB cannot save_env to a (host) file: the snippet must not boot a trial it could not count.
    device.agent(lambda s: set_primary(s, "B", 3))
    device.machine.write_config(f"set ota_env=(host){device.local}")
    result = device.boot()
    assert (result.slot, result.trial) == ("A", False)
    assert "cannot save the try counter of slot B" in result.log


@pytest.mark.parametrize(("try_flag", "left"), [("0", "0"), ("1", "1")], ids=["count-saved", "flag-saved"])
def test_last_try_torn_between_sectors_is_used_up_in_grub_and_in_python(
    device: Device, try_flag: str, left: str
) -> None:
    # GRUB's save_env rewrites the block's two sectors in place; a cut between them can
    # save only one of B_TRY=1 / OTA_B_LEFT=0. Either half alone must not commit B.
    device.agent(lambda s: set_primary(s, "B", 1))
    block = EnvBlock.parse(device.local.read_bytes())
    block.set("B_TRY", try_flag)
    block.set("OTA_B_LEFT", left)
    device.machine.write_env(block.to_bytes())
    assert device.state().slots["B"] == trial(0)
    assert device.boot().slot == "A"


def test_nine_tries_count_down_through_the_whole_table(device: Device) -> None:
    device.agent(lambda s: set_primary(s, "B", MAX_TRIES))
    assert [device.boot().slot for _ in range(MAX_TRIES + 1)] == ["B"] * MAX_TRIES + ["A"]


# --- same rules in GRUB and in Python ---------------------------------------

slot_boots = st.one_of(st.just(GOOD), st.just(BAD), st.integers(0, MAX_TRIES).map(trial))


@st.composite
def boot_states(draw: st.DrawFn) -> BootState:
    names = draw(st.sampled_from([AB, ("A", "B", "C")]))
    return BootState(
        order=tuple(draw(st.permutations(names))),
        slots={n: draw(slot_boots) for n in names},
        last_good=draw(st.one_of(st.none(), st.sampled_from(names))),
    )


@pytest.fixture(scope="module")
def devices() -> dict[tuple[str, ...], Device]:
    return {}


@settings(max_examples=60, deadline=None)
@given(state=boot_states())
def test_grub_script_chooses_and_saves_exactly_what_the_model_does(
    state: BootState, devices: dict[tuple[str, ...], Device], tmp_path_factory: pytest.TempPathFactory
) -> None:
    names = tuple(sorted(state.slots))
    if names not in devices:
        devices[names] = Device(tmp_path_factory.mktemp("prop"), names)
    device = devices[names]
    device.put(state)
    before = device.machine.read_env()
    saved, decision = choose(state)
    result = device.boot()
    assert (result.slot, result.trial, result.reason) == (decision.slot, decision.trial, decision.reason)
    assert device.state() == saved
    if not decision.trial:
        assert device.machine.read_env() == before


# --- a device still running RAUC's stock GRUB script ------------------------

# RAUC's contrib/grub.conf algorithm as documented in research/features.md 3.2
# (written here from that description): walk ORDER, set the slot's TRY=1 before
# deciding, boot the first with OK=1 TRY=0; if none, reset TRY=0 where OK=1 and
# boot the rescue entry; save A_TRY B_TRY.
RAUC_STYLE = """\
set ORDER="A B"
set A_OK=0
set B_OK=0
set A_TRY=0
set B_TRY=0
load_env -f "$ota_env"
set ota_slot=""
for S in $ORDER; do
  if [ -z "$ota_slot" ]; then
    if [ "$S" = A ]; then set OK=$A_OK; set TRY=$A_TRY; set A_TRY=1; fi
    if [ "$S" = B ]; then set OK=$B_OK; set TRY=$B_TRY; set B_TRY=1; fi
    if [ "$OK" = 1 -a "$TRY" = 0 ]; then set ota_slot=$S; fi
  fi
done
if [ -z "$ota_slot" ]; then
  if [ "$A_OK" = 1 ]; then set A_TRY=0; fi
  if [ "$B_OK" = 1 ]; then set B_TRY=0; fi
  set ota_slot=rescue
fi
save_env -f "$ota_env" A_TRY B_TRY
set ota_trial=0
set ota_cmdline="ota.slot=$ota_slot rauc.slot=$ota_slot"
set default="ota-$ota_slot"
echo "ota: booting slot $ota_slot (rauc)"
"""


def test_device_on_raucs_stock_script_switches_with_our_variables(tmp_path: Path) -> None:
    snippet = tmp_path / "rauc.cfg"
    snippet.write_text(RAUC_STYLE)
    device = Device(tmp_path)
    device.machine = GrubEmuMachine(tmp_path / "rauc-machine", AB, snippet=snippet)
    device.machine.write_env(device.local.read_bytes())
    # that script spends a try on every boot; the agent commits the booted slot each time
    assert device.boot().slot == "A"
    assert device.state().slots["A"] == trial(0)
    device.agent(lambda s: mark_good(s, "A"))
    # an update: our primary gets its one try under RAUC's script ...
    device.agent(lambda s: set_primary(s, "B", 3))
    assert device.boot().slot == "B"
    assert device.state().slots["B"] == trial(0)
    # ... not committed: the next power-on falls back to A
    assert device.boot().slot == "A"
    device.agent(lambda s: mark_good(s, "A"))
    # a second update that is committed stays
    device.agent(lambda s: set_primary(s, "B", 3))
    assert device.boot().slot == "B"
    device.agent(lambda s: mark_good(s, "B"))
    assert device.boot().slot == "B"
    assert device.state().last_good == "B"
