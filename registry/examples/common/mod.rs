//! What the `register` and `watch` examples share: the registry arguments and the shutdown wait.

use clap::ValueEnum;
use keel_registry::Dialect;
use keel_registry::dialect::{DubboOptions, SpringOptions};

/// Registry layout.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum DialectArg {
    /// Curator / Spring Cloud JSON.
    Spring,
    /// Dubbo interface-level URLs.
    Dubbo,
}

/// Which ZooKeeper, layout and service an example works on.
#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// ZooKeeper connect string (host:port[,host:port…]).
    #[arg(long)]
    pub(crate) zk: String,
    /// Root path (default /services for spring, /dubbo for dubbo).
    #[arg(long)]
    pub(crate) root: Option<String>,
    /// Registry layout.
    #[arg(long, value_enum)]
    pub(crate) dialect: DialectArg,
    /// Service name.
    #[arg(long)]
    pub(crate) service: String,
    /// Java interface (dubbo only; default: the service name).
    #[arg(long)]
    pub(crate) interface: Option<String>,
}

impl Target {
    /// The dialect, under `--root` when given.
    pub(crate) fn dialect(&self) -> Dialect {
        match self.dialect {
            DialectArg::Spring => {
                let mut options = SpringOptions::default();
                if let Some(root) = &self.root {
                    options = options.with_root(root.clone());
                }
                Dialect::Spring(options)
            }
            DialectArg::Dubbo => {
                let mut options = DubboOptions::default();
                if let Some(root) = &self.root {
                    options = options.with_root(root.clone());
                }
                Dialect::Dubbo(options)
            }
        }
    }

    /// The Dubbo interface: `--interface`, or the service name.
    pub(crate) fn interface(&self) -> String {
        self.interface
            .clone()
            .unwrap_or_else(|| self.service.clone())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn wait_for_shutdown() -> Result<(), std::io::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
