//! `idem`: look at and operate on the keys an idem store holds, on any store (Redis,
//! PostgreSQL, MySQL/MariaDB, SQLite), through the store's
//! [`Operations`](idem_runtime::Operations).
//!
//! ```text
//! idem --store redis://127.0.0.1:6379 inspect coupons 1001
//! idem --store redis+cluster://10.0.0.1:7000,10.0.0.2:7000 stats coupons
//! idem list coupons --state in-flight       # the store from IDEM_STORE
//! idem stats coupons                      # `idem counts` is an alias
//! idem forget coupons 1001 --yes            # the next delivery of 1001 runs again
//! idem release coupons 1004 --force --yes   # free a key whose holder is stuck
//! idem migrate --store postgres://postgres@127.0.0.1/app
//! idem migrate --print --store postgres://postgres@127.0.0.1/app > idem.sql  # for a DBA
//! idem purge --yes --store postgres://postgres@127.0.0.1/app  # expired rows
//! ```
//!
//! # Keys
//!
//! A key is typed as the text idem keeps for it, which is what `Key::new` writes: an integer in
//! decimal (`Call::new(&1001u64)` is `1001`), a string as it is, a UUID (or `[u8; 16]`) in its
//! hyphenated lowercase form, a key built from a template (`key = "{tenant}:{id}"`) with its
//! parts' reserved characters percent-escaped (`a%3Ab:7`). Text over 200 bytes, or with NUL, is
//! kept as its `sha256:<hex>`; typing the long text finds it too.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | done (`inspect`: the key has a record) |
//! | 1    | not found: the key has no record (or nothing `forget`/`release` applies to) |
//! | 2    | refused: a live lease without `--force`, `release` of a done key, or `forget`/`release`/`purge` not confirmed (stdin not a terminal and no `--yes`) |
//! | 3    | the store is unreachable (or failed) |
//! | 4    | the store answered something the command cannot use (a corrupt record) |
//! | 64   | usage: bad arguments, bad store URL, bad table name |

mod store;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use idem_runtime::{Changed, Counts, Key, KeyState, ListQuery, StateFilter, StoreError};
use serde_json::{Value, json};

use store::{AnyStore, OpenError, Target};

/// Exit code: the key has no record.
const EXIT_NOT_FOUND: u8 = 1;
/// Exit code: the operation was refused.
const EXIT_REFUSED: u8 = 2;
/// Exit code: the store is unreachable or failed.
const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: the store's answer cannot be used.
const EXIT_STORE: u8 = 4;
/// Exit code: a usage error (as `EX_USAGE` of sysexits.h).
const EXIT_USAGE: u8 = 64;

/// How long one operation may wait for the store.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Inspect and operate on the keys of an idem store.
///
/// Exit codes: 0 done, 1 not found, 2 refused (a live lease without --force, or not confirmed:
/// forget, release and purge ask on a terminal and need --yes otherwise), 3 store
/// unreachable, 4 store error, 64 usage.
#[derive(Debug, Parser)]
#[command(name = "idem", version)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON (one object) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Print keys (and `list`'s cursor, which holds a key) in clear text. Without it, keys are
    /// printed in the runtime's redacted form, `redacted:<12 hex>` (keys are often personal
    /// data; `IDEM_REDACTION_KEY` makes the form match the services' logs).
    #[arg(long, global = true)]
    reveal: bool,
    #[command(subcommand)]
    command: Command,
}

/// Which store.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The store: redis://host:port/db, rediss://…, redis+cluster://host:port[,host:port…]
    /// (a Redis Cluster, through any of its nodes), postgres://user@host/db,
    /// mysql://user@host/db (or mariadb://), sqlite://path/to/file.
    #[arg(long, env = "IDEM_STORE", global = true, hide_env_values = true)]
    store: Option<String>,
    /// The SQL stores' table, when not the default `idem_keys`.
    #[arg(long, global = true)]
    table: Option<String>,
    /// The Redis store's key prefix, when not the default `idem:`.
    #[arg(long, global = true)]
    prefix: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Show a key's state: absent, in flight (fence, lease left, holder), done, free.
    Inspect {
        /// The scope, as named in the attribute or `Options::new`.
        scope: String,
        /// The key's text (an integer in decimal, a string as it is).
        key: String,
    },
    /// List a scope's keys, page by page.
    List {
        /// The scope.
        scope: String,
        /// Only keys in this state.
        #[arg(long, value_enum)]
        state: Option<ListState>,
        /// Only leases taken at least this many seconds ago (stores that keep when).
        #[arg(long, value_name = "SECONDS")]
        older_than: Option<u64>,
        /// The most keys to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue where a previous `list` stopped (the cursor it printed).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Count a scope's keys per state (reads every record of the scope).
    #[command(visible_alias = "counts")]
    Stats {
        /// The scope.
        scope: String,
    },
    /// Let a done key run again on its next delivery.
    Forget {
        /// The scope.
        scope: String,
        /// The key's text.
        key: String,
        /// Also forget a key held by a live lease (its holder's done mark is then refused).
        #[arg(long)]
        force: bool,
        /// Do it without asking (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Free a key in flight whose holder is dead or stuck.
    Release {
        /// The scope.
        scope: String,
        /// The key's text.
        key: String,
        /// Also release a live lease (its holder's done mark is then refused).
        #[arg(long)]
        force: bool,
        /// Do it without asking (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Create or upgrade a SQL store's table (a SQLite file is created if missing).
    Migrate {
        /// Print the SQL, for a DBA to apply, instead of applying it (connects to nothing).
        #[arg(long)]
        print: bool,
    },
    /// Delete a SQL store's expired rows (released keys, lapsed leases, done records past their
    /// `keep`), in short batches; Redis expires its records itself.
    Purge {
        /// The most rows one statement deletes.
        #[arg(long, default_value_t = 1000)]
        batch: u32,
        /// Do it without asking (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `--state` of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListState {
    /// Done keys.
    Done,
    /// Keys held by a lease, live or lapsed.
    InFlight,
    /// Free keys: released, forgotten, or done past their `keep`.
    Free,
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The store could not be reached, or failed an operation.
    #[error("the store is unreachable or failed: {0}")]
    Unavailable(StoreError),
    /// The store answered something this command cannot use.
    #[error("store error: {0}")]
    Store(StoreError),
    /// The store did not answer in time.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Open(OpenError::BadUrl { .. } | OpenError::BadTable(_)) => EXIT_USAGE,
            Failure::Open(OpenError::Unreachable { .. }) => EXIT_UNREACHABLE,
            Failure::Unavailable(_) => EXIT_UNREACHABLE,
            Failure::Store(_) => EXIT_STORE,
            Failure::Timeout(_) => EXIT_UNREACHABLE,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::TransactionGone(_) => Failure::Unavailable(e),
            _ => Failure::Store(e),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { EXIT_USAGE } else { 0 });
        }
    };
    // Keys print through `Key`'s `Display`: redacted unless --reveal.
    idem_runtime::reveal_keys(cli.reveal);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idem: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_STORE);
        }
    };
    match runtime.block_on(execute(&cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("idem: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Bound an operation on the store by [`OP_TIMEOUT`].
async fn timed<T>(f: impl Future<Output = Result<T, StoreError>>) -> Result<T, Failure> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(_) => Err(Failure::Timeout(OP_TIMEOUT)),
    }
}

fn key_of(text: &str) -> Result<Key, Failure> {
    Key::from_text(text.to_owned()).map_err(|e| Failure::Usage(format!("invalid key: {e}")))
}

/// Run the command; the exit code of an answer (0, 1 or 2).
async fn execute(cli: &Cli) -> Result<u8, Failure> {
    let Some(url) = cli.store.store.clone() else {
        return Err(Failure::Usage(
            "no store: pass --store <URL> or set IDEM_STORE".to_owned(),
        ));
    };
    if let Some(what) = destructive(&cli.command)?
        && !confirmed(&what)
    {
        return Ok(EXIT_REFUSED);
    }
    let target = Target {
        url,
        table: cli.store.table.clone(),
        prefix: cli.store.prefix.clone(),
        create: matches!(cli.command, Command::Migrate { .. }),
    };
    if let Command::Migrate { print: true } = cli.command {
        return print_migration(cli, &target);
    }
    let store = match tokio::time::timeout(OP_TIMEOUT, store::open(&target)).await {
        Ok(r) => r?,
        Err(_) => return Err(Failure::Timeout(OP_TIMEOUT)),
    };
    let ops = store.ops();
    match &cli.command {
        Command::Inspect { scope, key } => {
            let key = key_of(key)?;
            let state = timed(ops.inspect(scope, &key)).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({"scope": scope, "key": key.to_string(), "state": state_json(&state)})
                );
            } else {
                println!("scope: {scope}\nkey:   {key}");
                print!("{}", state_text(&state));
            }
            Ok(if state == KeyState::Absent {
                EXIT_NOT_FOUND
            } else {
                0
            })
        }
        Command::List {
            scope,
            state,
            older_than,
            limit,
            cursor,
        } => list(cli, ops, scope, *state, *older_than, *limit, cursor.clone()).await,
        Command::Stats { scope } => {
            let c = timed(ops.counts(scope)).await?;
            if cli.json {
                println!("{}", json!({"scope": scope, "counts": counts_json(&c)}));
            } else {
                println!(
                    "scope: {scope}\nin_flight: {}\nlapsed:    {}\ndone:      {}\nfree:      {}",
                    c.in_flight, c.lapsed, c.done, c.free
                );
            }
            Ok(0)
        }
        Command::Forget {
            scope, key, force, ..
        } => {
            let key = key_of(key)?;
            let changed = timed(ops.forget(scope, &key, *force)).await?;
            Ok(report_change(cli, "forget", scope, &key, &changed))
        }
        Command::Release {
            scope, key, force, ..
        } => {
            let key = key_of(key)?;
            let changed = timed(ops.release_stuck(scope, &key, *force)).await?;
            Ok(report_change(cli, "release", scope, &key, &changed))
        }
        Command::Migrate { .. } => migrate(cli, &store).await,
        Command::Purge { batch, .. } => {
            let deleted = timed(store.purge(*batch)).await?;
            match (cli.json, deleted) {
                (true, n) => println!("{}", json!({"purged": n})),
                (false, Some(n)) => println!("purged: {n} expired rows deleted"),
                (false, None) => println!("nothing to purge: Redis expires its records itself"),
            }
            Ok(0)
        }
    }
}

/// What a destructive command without `--yes` is about to do (`None`: not destructive, or
/// `--yes`).
fn destructive(command: &Command) -> Result<Option<String>, Failure> {
    Ok(match command {
        Command::Forget {
            scope,
            key,
            force,
            yes: false,
        } => Some(format!(
            "forget {scope}/{}{}: its next delivery runs again",
            key_of(key)?,
            if *force { " (--force)" } else { "" }
        )),
        Command::Release {
            scope,
            key,
            force,
            yes: false,
        } => Some(format!(
            "release {scope}/{}{}: its next delivery runs, the holder's mark is refused",
            key_of(key)?,
            if *force { " (--force)" } else { "" }
        )),
        Command::Purge { yes: false, .. } => {
            Some("purge: delete the store's expired rows".to_owned())
        }
        _ => None,
    })
}

/// Ask on the terminal whether to do `what`; without a terminal on stdin, refuse (`--yes` is
/// needed), with a message.
fn confirmed(what: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprintln!("idem: {what}; refused: stdin is not a terminal to confirm on, pass --yes");
        return false;
    }
    eprint!("idem: {what}. Proceed? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if stdin.lock().read_line(&mut answer).is_err() {
        return false;
    }
    let yes = matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes");
    if !yes {
        eprintln!("idem: not confirmed: nothing changed");
    }
    yes
}

/// `migrate --print`: the SQL, applied nowhere.
fn print_migration(cli: &Cli, target: &Target) -> Result<u8, Failure> {
    let sql = store::migration_sql(target)?;
    match (cli.json, sql) {
        (true, sql) => println!("{}", json!({"sql": sql})),
        (false, Some(sql)) => print!("{sql}"),
        (false, None) => println!("-- nothing to migrate: the Redis store has no schema"),
    }
    Ok(0)
}

async fn migrate(cli: &Cli, store: &AnyStore) -> Result<u8, Failure> {
    let applied = timed(store.migrate()).await?;
    if cli.json {
        println!("{}", json!({"migrated": applied}));
    } else if applied {
        println!("migrated: the table is up to date");
    } else {
        println!("nothing to migrate: the Redis store has no schema");
    }
    Ok(0)
}

async fn list(
    cli: &Cli,
    ops: &dyn idem_runtime::Operations,
    scope: &str,
    state: Option<ListState>,
    older_than: Option<u64>,
    limit: usize,
    mut cursor: Option<String>,
) -> Result<u8, Failure> {
    let filter = match state {
        None | Some(ListState::Free) => StateFilter::All,
        Some(ListState::Done) => StateFilter::Done,
        Some(ListState::InFlight) => StateFilter::InFlight,
    };
    let limit = limit.max(1);
    let mut records = Vec::new();
    // Page until `limit` keys are found or the scope ends; each page is bounded by the store.
    loop {
        let mut query = ListQuery::new(limit - records.len())
            .state(filter)
            .after(cursor.take());
        if let Some(secs) = older_than {
            query = query.older_than(Duration::from_secs(secs));
        }
        let page = timed(ops.list(scope, &query)).await?;
        records.extend(page.records.into_iter().filter(|r| {
            state != Some(ListState::Free) || matches!(r.state, KeyState::Free { .. })
        }));
        cursor = page.next;
        if cursor.is_none() || records.len() >= limit {
            break;
        }
    }
    records.truncate(limit);
    // The cursor holds the last key's text: shown only with --reveal.
    let more = cursor.is_some();
    let cursor = cursor.filter(|_| cli.reveal);
    if cli.json {
        let keys: Vec<Value> = records
            .iter()
            .map(|r| json!({"key": shown_key(&r.key, cli.reveal), "state": state_json(&r.state)}))
            .collect();
        println!(
            "{}",
            json!({"scope": scope, "keys": keys, "more": more, "next": cursor})
        );
    } else {
        println!("{:<10} {:>16}  KEY", "STATE", "FENCE");
        for r in &records {
            let fence = match &r.state {
                KeyState::InFlight { fence, .. } | KeyState::Free { fence, .. } => {
                    fence.to_string()
                }
                KeyState::Done { fence, .. } => fence.map_or("-".to_owned(), |f| f.to_string()),
                _ => "-".to_owned(),
            };
            println!(
                "{:<10} {:>16}  {}",
                r.state.name(),
                fence,
                shown_key(&r.key, cli.reveal)
            );
        }
        let n = records.len();
        match &cursor {
            Some(c) => println!(
                "({n} {}; more: idem list {scope} --reveal --cursor '{c}')",
                plural(n, "key")
            ),
            None if more => println!(
                "({n} {}; more: the cursor holds a key, so `--reveal` prints it)",
                plural(n, "key")
            ),
            None => println!("({n} {})", plural(n, "key")),
        }
    }
    Ok(0)
}

/// A key the store listed: its text with `--reveal`, else its `Key`'s redacted `Display`. (A key
/// kept as `sha256:<hex>` is redacted as that text, so its form differs from the runtime's logs.)
fn shown_key(text: &str, reveal: bool) -> String {
    if reveal {
        return text.to_owned();
    }
    Key::from_text(text.to_owned())
        .map_or_else(|_| "redacted:(not a key)".to_owned(), |k| k.to_string())
}

/// `key` or `keys`.
fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// Print what `forget`/`release` did; its exit code.
fn report_change(cli: &Cli, op: &str, scope: &str, key: &Key, changed: &Changed) -> u8 {
    let (result, code) = match changed {
        Changed::Freed { .. } => ("freed", 0),
        Changed::NotFound => ("not_found", EXIT_NOT_FOUND),
        Changed::Refused { .. } => ("refused", EXIT_REFUSED),
        _ => ("unknown", EXIT_STORE),
    };
    if cli.json {
        let mut v = json!({"op": op, "scope": scope, "key": key.to_string(), "result": result});
        match changed {
            Changed::Freed { fence } => v["fence"] = json!(fence),
            Changed::Refused { state } => v["state"] = state_json(state),
            _ => {}
        }
        println!("{v}");
        return code;
    }
    match changed {
        Changed::Freed { fence } => println!(
            "{op}: {scope}/{key} freed (fence now {fence}): its next delivery runs; a late mark of the old holder is refused"
        ),
        Changed::NotFound => {
            eprintln!(
                "idem: {op}: {scope}/{key}: nothing to do, the key has no record it applies to"
            )
        }
        Changed::Refused { state } => {
            let why = match state {
                KeyState::InFlight { .. } => format!(
                    "it is held by a live lease ({}); pass --force if its holder is dead or stuck (its late mark will be refused)",
                    lease_summary(state)
                ),
                KeyState::Done { .. } => {
                    "it is done, not in flight: use `idem forget` to let it run again".to_owned()
                }
                other => format!("its state is {}", other.name()),
            };
            eprintln!("idem: {op}: {scope}/{key} refused: {why}");
        }
        _ => eprintln!("idem: {op}: {scope}/{key}: unexpected answer {changed:?}"),
    }
    code
}

fn lease_summary(state: &KeyState) -> String {
    match state {
        KeyState::InFlight {
            fence,
            lease_left,
            holder,
            ..
        } => format!(
            "fence {fence}, {} left{}",
            human(*lease_left),
            holder
                .as_deref()
                .map(|h| format!(", holder {h}"))
                .unwrap_or_default()
        ),
        _ => String::new(),
    }
}

/// A duration as `1h2m3s`, `4.5s` or `120ms`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            format!("{h}h{m}m{s}s")
        } else {
            format!("{m}m{s}s")
        }
    } else if secs >= 1 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn state_text(state: &KeyState) -> String {
    let mut out = format!("state: {}\n", state.name());
    match state {
        KeyState::Absent => out.push_str("       no record: the next delivery runs\n"),
        KeyState::InFlight {
            fence,
            lease_left,
            lapsed,
            held_for,
            holder,
        } => {
            out.push_str(&format!("fence: {fence}\n"));
            if *lapsed {
                out.push_str("lease: lapsed (the next delivery takes the key over)\n");
            } else {
                out.push_str(&format!("lease: {} left\n", human(*lease_left)));
            }
            if let Some(h) = held_for {
                out.push_str(&format!("held:  for {}\n", human(*h)));
            }
            out.push_str(&format!(
                "holder: {}\n",
                holder.as_deref().unwrap_or("(not kept by this store)")
            ));
        }
        KeyState::Done {
            fence,
            kept_for,
            fingerprint,
            output_bytes,
            replayable,
        } => {
            if let Some(f) = fence {
                out.push_str(&format!("fence: {f}\n"));
            }
            out.push_str(&format!("kept:  {} more\n", human(*kept_for)));
            out.push_str(&format!(
                "output: {output_bytes} bytes{}\n",
                if *replayable { "" } else { " (not replayable)" }
            ));
            out.push_str(&format!(
                "fingerprint: {}\n",
                if *fingerprint { "yes" } else { "no" }
            ));
        }
        KeyState::Free { fence, forgotten } => {
            out.push_str(&format!("fence: {fence}\n"));
            out.push_str(if *forgotten {
                "       forgotten by an operator: the next delivery runs, the old holder's mark is refused\n"
            } else {
                "       released: the next delivery runs\n"
            });
        }
        _ => out.push_str(&format!("       {state:?}\n")),
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn state_json(state: &KeyState) -> Value {
    let mut v = json!({"name": state.name()});
    match state {
        KeyState::Absent => {}
        KeyState::InFlight {
            fence,
            lease_left,
            lapsed,
            held_for,
            holder,
        } => {
            v["fence"] = json!(fence);
            v["lease_left_ms"] = json!(millis(*lease_left));
            v["lapsed"] = json!(lapsed);
            v["held_for_ms"] = json!(held_for.map(millis));
            v["holder"] = json!(holder);
        }
        KeyState::Done {
            fence,
            kept_for,
            fingerprint,
            output_bytes,
            replayable,
        } => {
            v["fence"] = json!(fence);
            v["kept_for_ms"] = json!(millis(*kept_for));
            v["fingerprint"] = json!(fingerprint);
            v["output_bytes"] = json!(output_bytes);
            v["replayable"] = json!(replayable);
        }
        KeyState::Free { fence, forgotten } => {
            v["fence"] = json!(fence);
            v["forgotten"] = json!(forgotten);
        }
        _ => {}
    }
    v
}

fn counts_json(c: &Counts) -> Value {
    json!({"in_flight": c.in_flight, "lapsed": c.lapsed, "done": c.done, "free": c.free})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(120)), "120ms");
        assert_eq!(human(Duration::from_millis(4500)), "4.5s");
        assert_eq!(human(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn integer_keys_are_their_decimal_text() {
        assert_eq!(key_of("1001").unwrap(), Key::new(&1001u64).unwrap());
    }
}
