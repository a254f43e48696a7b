//! Starting and stopping a gate: bind every port (so a bad address fails before anything runs),
//! start one pinned glommio executor per core, and on SIGTERM/SIGINT let every shard say
//! go-away, drain, and exit.

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::io::{self, Events, Stop};
use crate::lifecycle::Port;
use crate::mesh::Mesh;
use crate::metrics::ShardMetrics;
use crate::net;
use crate::state::{Shard, Shared};
use glommio::{LocalExecutorBuilder, Placement};
use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

/// io_uring depth per executor. Every idle connection keeps a readiness poll pending, and the
/// kernel sizes the table it searches them in by the ring's depth: glommio's default (128)
/// leaves a handful of buckets for thousands of polls, and closing or cancelling one walks a
/// long chain (it dominated a 15,000-session reconnect storm).
const RING_DEPTH: usize = 4096;
/// The app ring's submission queue: a turn's sends and re-arms; more are flushed as they come.
const RING_SQ: u32 = 4096;

/// Why a gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration was invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A port could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which port.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something else at start-up.
    #[error("{0}")]
    Other(String),
}

/// Runs a gate until it is told to stop (a signal, or POST /drain on the admin port); returns
/// once every shard has drained. `log` lets the admin port change the log filter.
pub fn run(cfg: Config, ports_file: Option<&Path>, log: Option<admin::LogControl>) -> Result<(), StartError> {
    let cores = cfg.resolved_cores()?;
    // Read now, like the keys: an admin token file that cannot be used stops the gate here.
    let admin_secret = cfg.admin_secret()?;
    // Keys before ports: a missing or malformed key file stops the gate before it binds.
    let keys = Arc::new(cfg.key_ring(crate::net::now_ms())?);
    // The Redis CA file likewise: read now, not when the directory first connects.
    let redis_roots = cfg.redis_tls_roots()?;
    let shards = cores.len();
    let app_addr = cfg.app.listen;
    let app = net::listen_all(app_addr, cfg.app.backlog, shards).map_err(|source| StartError::Bind {
        what: "app port",
        addr: cfg.app.listen.to_string(),
        source,
    })?;
    let sidecar_addr = cfg.sidecar.listen;
    let sidecar = net::listen_all(sidecar_addr, 128, shards).map_err(|source| StartError::Bind {
        what: "sidecar port",
        addr: cfg.sidecar.listen.to_string(),
        source,
    })?;
    let admin_addr = cfg.admin.listen;
    let admin = net::listen(admin_addr, 128).map_err(|source| StartError::Bind {
        what: "admin port",
        addr: cfg.admin.listen.to_string(),
        source,
    })?;
    let app_bound = app[0].local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let admin_bound = admin.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let sidecar_bound = sidecar[0].local_addr().map_err(|e| StartError::Other(e.to_string()))?;

    let node = if cfg.gate.advertise.is_empty() {
        let ip = if app_bound.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            app_bound.ip().to_string()
        };
        format!("{ip}:{}", app_bound.port())
    } else {
        cfg.gate.advertise.clone()
    };
    if cfg.uses_dev_secret() {
        tracing::warn!(
            "USING THE BUILT-IN DEVELOPMENT SECRET for tokens and/or the sidecar: anyone can log in as anyone. \
             Set auth.token_secret and sidecar.secret (or --token-secret / --sidecar-secret) in production."
        );
    }
    if cfg.app.plaintext {
        tracing::warn!(
            "THE APP PORT IS IN PLAINTEXT MODE (app.plaintext): login tokens and every frame cross the network \
             readable and forgeable by anyone on the path. Use it on trusted networks and for capacity tests only."
        );
    } else if keys.current().is_dev() {
        tracing::warn!(
            "USING THE BUILT-IN DEVELOPMENT KEY PAIR for the secure channel: its private key is public, so anyone \
             can read and impersonate this gate. Write a key pair with `gate keygen --out PATH` and set \
             channel.key_file in production."
        );
    }
    let incarnation = draw_incarnation();
    tracing::info!(version = crate::config::VERSION, app = %app_bound, sidecar = %sidecar_bound, admin = %admin_bound, shards, cores = ?cores, node = %node, incarnation = format_args!("{incarnation:016x}"), "gate listening");
    if let Some(path) = ports_file {
        write_ports(path, app_bound.port(), sidecar_bound.port(), admin_bound.port())
            .map_err(|e| StartError::Other(format!("cannot write ports file {}: {e}", path.display())))?;
    }

    let mesh = Arc::new(Mesh::new(shards));
    let cluster = if cfg.clustered() {
        Some(start_cluster(&cfg, redis_roots, &node, incarnation, mesh.clone())?)
    } else {
        None
    };
    let push_room =
        Arc::new(crate::sidecar::room::PushRoom::new(shards, cfg.limits.max_pushes_in_flight_per_shard));
    let shared = Shared {
        cfg: Arc::new(cfg),
        mesh: mesh.clone(),
        metrics: Arc::new((0..shards).map(|_| ShardMetrics::default()).collect()),
        gps_recent: Arc::new(Mutex::new(VecDeque::new())),
        sidecars: Arc::new(crate::delivery::Registry::new(shards)),
        drained: Arc::new(AtomicUsize::new(0)),
        began: Arc::new(AtomicUsize::new(0)),
        node,
        keys: keys.clone(),
        incarnation,
        cluster: cluster.clone(),
        push_room,
    };
    watch_signals(mesh)?;

    let mut admin = Some((admin, admin::Control::new(admin_secret, log)));
    let mut handles = Vec::with_capacity(shards);
    for (id, ((cpu, listener), sidecar)) in cores.iter().copied().zip(app).zip(sidecar).enumerate() {
        let shared = shared.clone();
        let admin = admin.take();
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .ring_depth(RING_DEPTH)
            .spawn(move || async move {
                shard_main(Shard::new(id as u16, shared), listener, sidecar, admin).await
            })
            .map_err(|e| StartError::Other(format!("cannot start shard {id} on cpu {cpu}: {e}")))?;
        handles.push(h);
    }
    for h in handles {
        h.join().map_err(|e| StartError::Other(format!("shard failed: {e}")))?;
    }
    if let Some(c) = cluster.and_then(Arc::into_inner) {
        // Gives up the lease at once, so the other nodes need not wait for it to lapse.
        c.handle.stop();
    }
    tracing::info!("gate stopped");
    Ok(())
}

/// One executor: its listeners and admin port as tasks that move bytes, and the shard's loop,
/// which owns the state and returns once shutdown completes.
async fn shard_main(
    shard: Shard,
    listener: std::net::TcpListener,
    sidecar: std::net::TcpListener,
    admin: Option<(std::net::TcpListener, admin::Control)>,
) {
    let id = shard.id;
    let events = Events::new();
    let stop = Stop::new();
    // SAFETY: the fd is a listening TCP socket we own; glommio takes ownership of it.
    let sidecar = unsafe { glommio::net::TcpListener::from_raw_fd(sidecar.into_raw_fd()) };
    let mut shard = shard;
    let mut listener = Some(listener);
    if shard.cfg.app.io == crate::config::AppIo::Uring {
        // The app port on the shard's own io_uring: the loop owns the listener and its ring.
        let app = &shard.cfg.app;
        let cfg = crate::uring::RingConfig {
            buffers: app.ring_buffers,
            buffer_size: app.ring_buffer_size,
            sq_entries: RING_SQ.min(app.ring_cq_entries),
            cq_entries: app.ring_cq_entries,
        };
        let fd = listener.as_ref().map_or(-1, |l| l.as_raw_fd());
        match crate::uring::AppRing::new(fd, cfg) {
            Ok(ring) => {
                tracing::info!(
                    shard = id,
                    buffers = cfg.buffers,
                    buffer_size = cfg.buffer_size,
                    cq_entries = cfg.cq_entries,
                    "app port on the shard's own io_uring (multishot accept and receive)"
                );
                shard.ring = Some(ring);
                shard.app_listener = listener.take();
            }
            Err(e) => tracing::warn!(
                shard = id,
                error = %e,
                "app port: io_uring multishot receive into a buffer ring is not available here \
                 (needs Linux >= 5.19); using glommio's readiness path instead"
            ),
        }
    }
    if let Some(listener) = listener {
        // SAFETY: the fd is a listening TCP socket we own; glommio takes ownership of it.
        let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
        let (e, s) = (events.clone(), stop.clone());
        glommio::spawn_local(async move {
            io::listener::run(Port::App, listener, e, async move { s.wait().await }).await
        })
        .detach();
    }
    let (e, s) = (events.clone(), stop.clone());
    glommio::spawn_local(async move {
        io::listener::run(Port::Sidecar, sidecar, e, async move { s.wait().await }).await
    })
    .detach();
    if let Some((admin, control)) = admin {
        // SAFETY: as above.
        let admin = unsafe { glommio::net::TcpListener::from_raw_fd(admin.into_raw_fd()) };
        let state = AdminState {
            metrics: shard.all_metrics.clone(),
            mesh: shard.mesh.clone(),
            gps_recent: shard.gps_recent.clone(),
            cluster: shard.cluster.clone(),
            control,
        };
        let s = stop.clone();
        glommio::spawn_local(async move { admin::run(admin, state, async move { s.wait().await }).await })
            .detach();
    }
    tracing::debug!(shard = id, "shard serving");
    crate::event_loop::run(shard, events, stop).await;
}

/// Cluster mode: this node's name (`gate.node_name`, else the address apps reach it at, which
/// is unique among the nodes) and the Redis thread, trusting `redis_roots` for TLS when given.
fn start_cluster(
    cfg: &Config,
    redis_roots: Option<cluster::TlsRoots>,
    node: &str,
    incarnation: u64,
    mesh: Arc<Mesh>,
) -> Result<Arc<crate::cluster::Cluster>, StartError> {
    let name = if cfg.gate.node_name.is_empty() { node.to_owned() } else { cfg.gate.node_name.clone() };
    if cfg.cluster.secret.0.is_empty() || cfg.cluster.secret.0 == crate::config::DEV_SECRET {
        tracing::warn!(
            "CLUSTER MODE ON THE BUILT-IN DEVELOPMENT SECRET: anyone who can reach this Redis can read and forge              messages between the nodes. Set cluster.secret (FLEETGATE_CLUSTER_SECRET) in production."
        );
    }
    let mut ccfg = cluster::Config::new(cfg.cluster.redis.clone());
    ccfg.lease_ms = cfg.cluster.lease_ms as u64;
    ccfg.tls_roots = redis_roots;
    let me = cluster::NodeInfo {
        name: name.clone(),
        app_addr: node.to_owned(),
        link_addr: String::new(),
        has_appserver: false,
        incarnation,
    };
    let c = crate::cluster::Cluster::start(ccfg, me, cfg.cluster_secret(), mesh)
        .map_err(|e| StartError::Other(format!("cluster.redis: {e}")))?;
    tracing::info!(node = %name, lease_ms = cfg.cluster.lease_ms, "cluster mode: directory in Redis");
    Ok(c)
}

/// A random non-zero incarnation for this process: the same on every sidecar connection, and a
/// different one after a restart (a collision has odds of 2^-64), so an app-server that
/// reconnects can tell whether the receipts it waits for can still come (PROTOCOL.md §9.9).
fn draw_incarnation() -> u64 {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

fn write_ports(path: &Path, app: u16, sidecar: u16, admin: u16) -> std::io::Result<()> {
    // Written to a temporary name and renamed, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "app={app}\nsidecar={sidecar}\nadmin={admin}")?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// SIGTERM/SIGINT: the first starts a graceful shutdown on every shard; a second exits at once.
fn watch_signals(mesh: Arc<Mesh>) -> Result<(), StartError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| StartError::Other(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen > 1 {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(1);
                }
                tracing::info!(signal = sig, "signal: graceful shutdown");
                mesh.shutdown_all();
            }
        })
        .map_err(|e| StartError::Other(format!("cannot start signal thread: {e}")))?;
    Ok(())
}
