# edge-ota U-Boot boot script (hush). Build: make -C hw/scripts  ->  boot.scr
#
# Chooses the slot to boot with the rules of hw/bootloader/model.py, on
# RAUC-compatible variables (docs/bootloaders.md, "U-Boot"):
#   BOOT_ORDER      bootnames by priority, e.g. "B A"          (unset: "A B")
#   BOOT_<x>_LEFT   attempts left for slot x, hex              (unset: 3)
#   OTA_TRIAL       bootnames on trial (normally one, or none)
#   OTA_LAST_GOOD   last committed slot
# Walk BOOT_ORDER: a slot with attempts left that is not on trial is committed
# and boots as is, nothing is written (power cuts never wear it down); a slot on
# trial with attempts left boots after its counter is decremented and saved; a
# slot with no attempts left is skipped. Nothing bootable: boot OTA_LAST_GOOD
# (failing that the first slot of BOOT_ORDER) instead of looping on resets.
# Unset variables get the defaults above, and those are saved.
#
# The board provides, per slot x, a command "ota_boot_<x>" that loads and boots
# that slot's kernel, and optionally "ota_bootargs" (console=..., etc.). This
# script sets bootargs to "${ota_bootargs} ota.slot=<x> rauc.slot=<x>" first.

# Scratch state lives in hush local variables, which saveenv does not store. An
# env variable of the same name would shadow a local one, so those are removed
# first; and since a local variable cannot be emptied again, "-" means "none".
setenv ota_slot
setenv ota_first
setenv ota_s
setenv ota_t
setenv ota_trial
setenv ota_why
setenv ota_save

ota_first=-
for ota_s in "${BOOT_ORDER}"; do
  if test "${ota_first}" = -; then
    ota_first=${ota_s}
  fi
done
if test "${ota_first}" = -; then
  setenv BOOT_ORDER "A B"
  ota_first=A
  setenv ota_save 1
fi

ota_slot=-
for ota_s in "${BOOT_ORDER}"; do
  setenv ota_left
  setenv ota_get "setenv ota_left \${BOOT_${ota_s}_LEFT}"
  run ota_get
  if test -z "${ota_left}"; then
    setenv ota_left 3
    setenv BOOT_${ota_s}_LEFT 3
    setenv ota_save 1
  fi
  if test "${ota_slot}" = -; then
    setexpr ota_left ${ota_left} + 0
    ota_trial=no
    for ota_t in "${OTA_TRIAL}"; do
      if test "${ota_t}" = "${ota_s}"; then
        ota_trial=yes
      fi
    done
    if test "${ota_left}" != 0; then
      if test "${ota_trial}" = yes; then
        setexpr BOOT_${ota_s}_LEFT ${ota_left} - 1
        setenv ota_save 1
        ota_slot=${ota_s}
        ota_why="trial boot, attempt counted"
      else
        ota_slot=${ota_s}
        ota_why="committed slot"
      fi
    fi
  fi
done

if test "${ota_slot}" = -; then
  if test -n "${OTA_LAST_GOOD}"; then
    ota_slot=${OTA_LAST_GOOD}
    ota_why="no bootable slot in BOOT_ORDER, last committed slot"
  else
    ota_slot=${ota_first}
    ota_why="no bootable slot and no committed slot, first in BOOT_ORDER"
  fi
fi

setenv ota_get
setenv ota_left
if test -n "${ota_save}"; then
  setenv ota_save
  saveenv
fi

echo "edge-ota: booting slot ${ota_slot} (${ota_why})"
setenv bootargs "${ota_bootargs} ota.slot=${ota_slot} rauc.slot=${ota_slot}"
run ota_boot_${ota_slot}
echo "edge-ota: ota_boot_${ota_slot} returned, slot ${ota_slot} did not boot; resetting"
reset
