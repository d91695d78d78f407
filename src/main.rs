//! The `userhub` command line: `serve` (default), `migrate`, `token`, `dlq` and
//! `reenrich`.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use std::time::Duration;
use userhub::bus::ReplayFilter;
use userhub::config::Settings;
use userhub::db::Database;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use userhub::startup::{
    Application, Bus, Roles, open_bus, open_database, open_documents, open_users,
};
use userhub::telemetry;
use userhub::users::Selection;
use userhub::web::auth::{LocalToken, mint_local_token, parse_ttl};
use userhub::web::identity::Role as AccessRole;
use uuid::Uuid;

/// mimalloc rather than the C library's malloc: a request allocates and frees many
/// small blocks, and glibc's malloc and free were 12% of a cached `GET`'s instructions
/// (5,600 of 46,000); with mimalloc the request runs about 7% fewer (README,
/// "Performance"). Built without transparent huge pages (Cargo.toml): with them 28 MB
/// of the idle RSS were 2 MiB pages, and it went from 27 to 50 MB (30 MB without).
/// examples/ceiling.rs, the benchmark's ceiling, uses it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// userhub: a user registry with asynchronous profile enrichment.
///
/// Configuration comes from config/default.toml, config/$APP_ENV.toml and APP__*
/// environment variables (e.g. APP__SERVER__PORT=9000); see the README.
#[derive(Debug, Parser)]
#[command(name = "userhub", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API and run the background workers (the default).
    ///
    /// Stops gracefully on SIGINT/SIGTERM: in-flight requests finish, workers stop
    /// between messages, and undelivered events wait in the database for the next start.
    Serve {
        /// What this process does, comma-separated: `api` (HTTP routes), `relay`
        /// (outbox to bus), `worker` (event consumers). Health and docs are always served.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "api,relay,worker",
            env = "USERHUB_ROLES"
        )]
        roles: Vec<Role>,
    },
    /// Apply pending migrations to database.url (and to documents.url when it is a
    /// separate SQLite file; a MongoDB store gets its index) and exit.
    Migrate,
    /// Check this instance's health over HTTP, for container health checks that have no
    /// shell or curl: exits 0 when GET answers 2xx within 2 s, else 1.
    Probe {
        /// The path to GET: /health (alive) or /health/ready (ready for traffic).
        #[arg(long, default_value = "/health")]
        path: String,
        /// The instance's base URL; default http(s)://127.0.0.1:{server.port}.
        #[arg(long)]
        url: Option<String>,
    },
    /// Print a bearer token signed with the configured HS256 secret (auth.hs256_secret
    /// or auth.hs256_secret_file), with the configured issuer and audience.
    ///
    /// For local use and scripts: TOKEN=$(userhub token --sub me --role admin)
    Token {
        /// The token's subject (`sub`): who it speaks for.
        #[arg(long)]
        sub: String,
        /// A role to grant (repeatable): users:read, users:write or admin (admin grants
        /// every role).
        #[arg(long = "role", value_name = "ROLE", value_parser = parse_access_role)]
        roles: Vec<AccessRole>,
        /// How long the token is valid: a whole number and a unit, s, m, h or d
        /// (30s, 15m, 1h, 1d), at most 365d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Inspect and replay dead letters (messages the workers gave up on).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Rebuild what is derived from users (the enriched profiles): republish users as
    /// `user.updated` events through the outbox, for a running `serve` to deliver.
    ///
    /// The profile store is derived data: a lost store is rebuilt with `--all`.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["all", "since", "uuids"])))]
    Reenrich {
        /// Every user (with a progress bar on a terminal).
        #[arg(long)]
        all: bool,
        /// Users created or changed at or after this instant (RFC 3339, e.g.
        /// 2026-11-30T00:00:00Z).
        #[arg(long, value_parser = parse_instant)]
        since: Option<DateTime<Utc>>,
        /// These users.
        #[arg(value_name = "UUID")]
        uuids: Vec<Uuid>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Print dead letters, oldest first, one JSON object per line.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start after this dead-letter id (the last id of a previous listing).
        #[arg(long)]
        after: Option<String>,
    },
    /// Put dead letters back on their queues with a fresh attempt count: one by id,
    /// or every one (`--all`), optionally only of a queue or with an error text.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Replay {
        /// The dead letter's id, as `dlq list` shows it.
        id: Option<String>,
        /// Every dead letter (narrowed by --queue and --error).
        #[arg(long)]
        all: bool,
        /// With --all: only the dead letters of this queue (e.g. enrichment.users).
        #[arg(long, requires = "all")]
        queue: Option<String>,
        /// With --all: only those whose error contains this text.
        #[arg(long, requires = "all")]
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Api,
    Relay,
    Worker,
}

fn parse_instant(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant ({e}): e.g. 2026-11-30T00:00:00Z"))
}

fn parse_access_role(raw: &str) -> Result<AccessRole, String> {
    AccessRole::parse(raw)
        .ok_or_else(|| format!("unknown role {raw:?}: use users:read, users:write or admin"))
}

fn roles_of(list: &[Role]) -> Roles {
    Roles {
        api: list.contains(&Role::Api),
        relay: list.contains(&Role::Relay),
        worker: list.contains(&Role::Worker),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("cannot load configuration")?;
    let serving = matches!(cli.command, None | Some(Command::Serve { .. }));
    // Only the server exports spans; the one-shot commands just log.
    let mut tracing_settings = settings.telemetry.clone();
    if !serving {
        tracing_settings.otlp_endpoint.clear();
    }
    let telemetry = if serving {
        telemetry::init(&settings.log, &tracing_settings, std::io::stdout)
    } else {
        // A one-shot command's stdout carries its result alone (a token, JSON lines).
        telemetry::init(&settings.log, &tracing_settings, std::io::stderr)
    };
    match cli.command.unwrap_or(Command::Serve {
        roles: vec![Role::Api, Role::Relay, Role::Worker],
    }) {
        Command::Serve { roles } => {
            let export_timeout = Duration::from_millis(settings.telemetry.export_timeout_ms);
            let served = match Application::build(settings, roles_of(&roles)).await {
                Ok(app) => app.run_until_stopped().await,
                Err(error) => Err(error),
            };
            // The spans of the last requests and messages are still queued.
            telemetry.shutdown(export_timeout).await;
            served
        }
        Command::Token { sub, roles, ttl } => {
            let token = LocalToken {
                subject: sub,
                roles,
                ttl,
            };
            println!("{}", mint_local_token(&settings.auth, &token).await?);
            Ok(())
        }
        Command::Dlq { command } => {
            let database = open_database(&settings).await?;
            let bus = open_bus(&settings, &database).await?;
            if let Bus::RabbitMq(rabbit) = &bus {
                rabbit.wait_until_connected(Duration::from_secs(10)).await?;
            }
            let bus = bus.event_bus();
            match command {
                DlqCommand::List { limit, after } => {
                    for letter in bus.dead_letters(limit, after.as_deref()).await? {
                        println!("{}", serde_json::to_string(&letter)?);
                    }
                }
                DlqCommand::Replay { id: Some(id), .. } => {
                    anyhow::ensure!(bus.replay(&id).await?, "no dead letter {id} to replay");
                    println!("replayed {id}");
                }
                DlqCommand::Replay {
                    id: None,
                    queue,
                    error,
                    ..
                } => {
                    let filter = ReplayFilter {
                        queue,
                        error_contains: error,
                    };
                    println!("replayed {}", bus.replay_all(&filter).await?);
                }
            }
            Ok(())
        }
        Command::Reenrich { all, since, uuids } => {
            let selection = match (all, since) {
                (true, _) => Selection::All,
                (false, Some(since)) => Selection::Since(since),
                (false, None) => Selection::Some(uuids),
            };
            reenrich(&settings, &selection).await
        }
        Command::Migrate => {
            let mut settings = settings;
            settings.database.migrate_on_start = true;
            let database = open_database(&settings).await?;
            open_documents(&settings, &database)
                .await?
                .prepare()
                .await
                .context("cannot prepare documents.url")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Probe { path, url } => probe(&settings, url, &path).await,
    }
}

/// Users republished per transaction.
const REENRICH_PAGE: u32 = 500;

async fn reenrich(settings: &Settings, selection: &Selection) -> anyhow::Result<()> {
    let (users, database) = open_users(settings).await?;
    let total = users.count(selection).await?;
    // Drawn only on a terminal; logs and scripts get the summary line alone.
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {wide_bar} {pos}/{len} users ({per_sec}, {eta} left)",
    )?);
    let request_id = format!("reenrich-{}", Uuid::now_v7());
    let republished = users
        .republish(selection, REENRICH_PAGE, &request_id, |done| {
            bar.set_position(done)
        })
        .await?;
    bar.finish_and_clear();
    if let Database::Postgres(pool) = &database {
        // A failure is logged there; the relays will poll.
        let _ = userhub::outbox::notify_relays(pool).await;
    }
    println!("queued {republished} users for re-enrichment");
    Ok(())
}

/// How long a probe may take, connection included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn probe(settings: &Settings, url: Option<String>, path: &str) -> anyhow::Result<()> {
    userhub::crypto::install_crypto_provider();
    let tls = settings.server.tls.enabled();
    let base = url.unwrap_or_else(|| {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", settings.server.port)
    });
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .connect_timeout(PROBE_TIMEOUT)
        .no_proxy()
        // The probe asks this instance whether it is alive, over loopback: the
        // certificate names the service's public host, not 127.0.0.1.
        .danger_accept_invalid_certs(tls)
        .build()?;
    let target = format!("{}{path}", base.trim_end_matches('/'));
    let status = client.get(&target).send().await?.status();
    anyhow::ensure!(status.is_success(), "{target} answered {status}");
    Ok(())
}
