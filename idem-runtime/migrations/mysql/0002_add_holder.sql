-- idem-runtime SQL store, MySQL and MariaDB, version 2: who holds a lease and since when, for
-- `inspect` and `list` (the operations API and the `idem` command line). Both columns are NULL
-- for rows written by version 1, and are set by every claim from now on.
-- State 3 (forgotten by an operator) needs no schema change.

ALTER TABLE {table} ADD COLUMN claimed_at BIGINT NULL, ADD COLUMN holder VARBINARY(100) NULL;
