-- idem-runtime SQL store, MySQL and MariaDB, version 1.
-- Applied by SqlStore::migrate(), which fills in {table} and {name} (the table's name without
-- its schema) and records the version in {table}_migrations. Times are microseconds since 1970
-- by the database's clock.
-- Scope and key are VARBINARY: compared byte for byte, never by a case- or accent-insensitive
-- collation, and trailing spaces count.

CREATE TABLE IF NOT EXISTS {table} (
    scope       VARBINARY(255) NOT NULL,
    idem_key    VARBINARY(255) NOT NULL,
    -- 0 free (released), 1 in flight, 2 done
    state       SMALLINT       NOT NULL,
    -- the lease token (16 bytes) of the holder, or of the caller that completed the key
    token       BINARY(16)     NOT NULL,
    fence       BIGINT         NOT NULL,
    -- end of the lease (in flight) or of the retention (done)
    expires_at  BIGINT         NOT NULL,
    fingerprint BINARY(16)     NULL,
    output      LONGBLOB       NULL,
    PRIMARY KEY (scope, idem_key),
    -- purge() finds expired rows by this index.
    KEY {name}_expires_at (expires_at)
) ENGINE = InnoDB;
