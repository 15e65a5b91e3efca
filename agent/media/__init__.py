"""Installing from removable media (USB sticks): one job per module.

  mount    mount a block device read-only (nosuid, nodev, noexec) in a private
           directory and always unmount it; or take an already-mounted directory
  scan     list the bundles on the stick by the layout convention
           (`ota_common.media`), never following a symlink, within bounds
  select   read each candidate's signed head once, verify it, and choose the
           newest compatible bundle; every other one is ignored with a reason
  source   the chosen bundle as a `BundleSource`: the verified head replayed
           from memory, the rest read on from the same open descriptor
  report   the receipt: written back onto the stick when it is writable, and
           queued in the outbox for the fleet
  job      the whole visit (scan, select, install, report) as one job
  poll     the fallback without udev: removable devices inserted since the last poll

docs/media.md describes the layout, the receipts and the security rules.
"""
