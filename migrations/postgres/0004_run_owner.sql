-- The process that runs a run (postgres dialect; keep in step with the other backend's 0004).
--
-- `<boot id>/<pid namespace>/<pid>/<start ticks>` of the `runner once` process on `host`
-- (src/once/owner.rs): a later `runner once` on the same machine finishes a `running` run
-- whose process is gone (killed, crashed, the machine rebooted) as errored, so a runner's
-- own death is recorded and not left `running`. NULL for runs of job attempts (their
-- leases expire instead) and for runs recorded before this migration.
ALTER TABLE runs ADD COLUMN owner TEXT;
