-- idem-runtime SQL store, SQLite, version 1.
-- Applied by SqlStore::migrate(), which fills in {table}, {name} (the table's name without its
-- schema) and {schema} (the schema and a dot, or nothing), and records the version in
-- {table}_migrations. Times are microseconds since 1970 by the database's clock.

CREATE TABLE IF NOT EXISTS {table} (
    scope       TEXT    NOT NULL,
    idem_key    TEXT    NOT NULL,
    -- 0 free (released), 1 in flight, 2 done
    state       INTEGER NOT NULL,
    -- the lease token (16 bytes) of the holder, or of the caller that completed the key
    token       BLOB    NOT NULL,
    fence       INTEGER NOT NULL,
    -- end of the lease (in flight) or of the retention (done)
    expires_at  INTEGER NOT NULL,
    fingerprint BLOB,
    output      BLOB,
    PRIMARY KEY (scope, idem_key)
);

-- purge() finds expired rows by this index.
CREATE INDEX IF NOT EXISTS {schema}{name}_expires_at ON {name} (expires_at);
