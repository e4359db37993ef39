-- Room on each page for HOT updates. A record's totals update of an open session changes no
-- indexed column (state_xid stays put while the session is open; the state publisher lists
-- open sessions by their tick instead), so PostgreSQL can write the new row version on the same
-- page without a new entry in any of the sessions' five indexes, and prune the old ones in
-- place. That needs free space on the page: the default fillfactor (100) leaves none.
-- Applies to pages written from now on.
ALTER TABLE production_sessions SET (fillfactor = 50);
ALTER TABLE session_worker_totals SET (fillfactor = 70);
