-- idem-runtime SQL store, PostgreSQL, version 1.
-- Applied by SqlStore::migrate(), which fills in {table} and {name} (the table's name without
-- its schema) and records the version in {table}_migrations. Times are microseconds since 1970
-- by the database's clock.

CREATE TABLE IF NOT EXISTS {table} (
    scope       TEXT     NOT NULL,
    idem_key    TEXT     NOT NULL,
    -- 0 free (released), 1 in flight, 2 done
    state       SMALLINT NOT NULL,
    -- the lease token (16 bytes) of the holder, or of the caller that completed the key
    token       BYTEA    NOT NULL,
    fence       BIGINT   NOT NULL,
    -- end of the lease (in flight) or of the retention (done)
    expires_at  BIGINT   NOT NULL,
    fingerprint BYTEA,
    output      BYTEA,
    PRIMARY KEY (scope, idem_key)
);

-- purge() finds expired rows by this index.
CREATE INDEX IF NOT EXISTS {name}_expires_at ON {table} (expires_at);
