-- A session edited by hand in SQL (an operator correcting a wrong openedAt, a test moving
-- time) is seen by every gateway as the gateway's own changes are.
--
-- The deadline is kept twice: expires_at (the sweeper's index) and opened_at +
-- max_duration_hours (what a record is judged by). The gateway writes both together; a
-- statement that moves opened_at or max_duration_hours without expires_at gets expires_at
-- recomputed, so the sweeper and the record path agree.
--
-- Gateways cache a session's admission facts until its version moves, and record inserts are
-- guarded by that version. The gateway bumps it on every close, expiry and extend; a statement
-- that changes the deadline or the status without bumping it gets it bumped here, with the
-- state's tick, so caches are dropped and the retained state is republished.
--
-- Neither trigger fires on the hot path: a record batch sets none of these columns.

CREATE FUNCTION hydrobit_session_hand_edit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at
       AND (NEW.opened_at IS DISTINCT FROM OLD.opened_at
            OR NEW.max_duration_hours IS DISTINCT FROM OLD.max_duration_hours) THEN
        NEW.expires_at := NEW.opened_at + make_interval(secs => NEW.max_duration_hours * 3600);
    END IF;
    IF NEW.version = OLD.version
       AND (NEW.expires_at IS DISTINCT FROM OLD.expires_at
            OR NEW.status IS DISTINCT FROM OLD.status
            OR NEW.owner_id IS DISTINCT FROM OLD.owner_id
            OR NEW.company_id IS DISTINCT FROM OLD.company_id) THEN
        NEW.version := OLD.version + 1;
        NEW.state_tick := nextval('session_state_tick');
        NEW.state_xid := pg_current_xact_id()::text::bigint;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER production_sessions_hand_edit
    BEFORE UPDATE OF opened_at, max_duration_hours, expires_at, status, owner_id, company_id
    ON production_sessions
    FOR EACH ROW EXECUTE FUNCTION hydrobit_session_hand_edit();

-- The notification follows the version however it moved (a BEFORE trigger's change to it
-- does not count as "UPDATE OF version").
DROP TRIGGER production_sessions_version_changed ON production_sessions;
CREATE TRIGGER production_sessions_version_changed
    AFTER UPDATE OF version, opened_at, max_duration_hours, expires_at, status, owner_id,
        company_id
    ON production_sessions
    FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION hydrobit_session_changed();
