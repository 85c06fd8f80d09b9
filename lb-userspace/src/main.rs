use std::{path::PathBuf, time::SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb::{
    agent::{self, AgentConfig, DEFAULT_ADMIN, DEFAULT_BPFFS},
    api::{self, StatusView},
    dataplane,
    events::EventsLevel,
    views::{self, EndpointsView, ServiceView},
};

/// An eBPF load balancer for Kubernetes Services.
#[derive(Parser)]
#[command(name = "lb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: program the datapath from the API server's Services and EndpointSlices,
    /// or (standalone mode, --manifests) from a folder of manifests.
    Agent(Box<AgentConfig>),
    /// Show Services or Endpoints as the running agent sees them, like kubectl get.
    Get {
        resource: Resource,
        /// Namespace to list.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// List every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Datapath packet counters, attached interfaces and manifest problems of the running agent.
    Status {
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Show or switch the datapath events the running agent logs: off, drops (every dropped
    /// packet with its reason) or flows (drops and every new flow's backend).
    Events {
        level: Option<EventsLevel>,
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
    },
    /// Detach every program and remove every map and link the agent pinned.
    Reset {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Resource {
    #[value(alias = "svc", alias = "service")]
    Services,
    #[value(alias = "ep", alias = "endpoint")]
    Endpoints,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Json,
}

/// An error is one line, `lb: ` and its causes, whatever RUST_BACKTRACE says: anyhow's own
/// report would add a stack trace when it is set.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Agent(_)) {
        // A CLI command piped into `head` ends quietly when the reader goes, as other tools
        // do (Rust ignores SIGPIPE, and printing would panic). The agent keeps ignoring it.
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Agent(config) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        // hickory logs every DNS query at info.
                        .unwrap_or_else(|_| "info,hickory_server=warn,hickory_net=warn".into()),
                )
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(*config))
        }
        Command::Get {
            resource,
            namespace,
            all_namespaces,
            output,
            admin,
        } => {
            let list = List {
                admin: &admin,
                namespace: &namespace,
                all_namespaces,
                output,
            };
            match resource {
                Resource::Services => list.print::<ServiceView>(
                    api::SERVICES_PATH,
                    |v| &v.namespace,
                    views::services_table,
                ),
                Resource::Endpoints => list.print::<EndpointsView>(
                    api::ENDPOINTS_PATH,
                    |v| &v.namespace,
                    views::endpoints_table,
                ),
            }
        }
        Command::Status { admin, output } => {
            let status: StatusView = api::fetch(&admin, api::STATUS_PATH)?;
            match output {
                Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&status)?),
                None => {
                    println!("node: {}", status.node_name);
                    println!(
                        "attached interfaces: {}",
                        status.attached_interfaces.join(" ")
                    );
                    if !status.xdp.is_empty() {
                        println!("XDP: {}", status.xdp.join(", "));
                    }
                    match &status.socket_lb {
                        Some(cgroup) => println!("connect-time load balancing: {cgroup}"),
                        None => println!("connect-time load balancing: off"),
                    }
                    let addresses: Vec<String> = status
                        .node_addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect();
                    println!("nodePort addresses: {}", addresses.join(" "));
                    println!("datapath events: {}", status.datapath_events.as_str());
                    println!("backend choice: {}", status.backend_choice);
                    println!("clients with affinity: {}", status.affinity_entries);
                    println!("object problems: {}", status.errors.len());
                    for e in &status.errors {
                        println!("  {e}");
                    }
                    let rows: Vec<Vec<String>> = status
                        .counters
                        .iter()
                        .map(|(n, v)| vec![n.clone(), v.to_string()])
                        .collect();
                    print!("{}", views::table(&["COUNTER", "PACKETS"], &rows));
                }
            }
            Ok(())
        }
        Command::Events { level, admin } => {
            let now = match level {
                Some(level) => api::put_text(&admin, api::EVENTS_PATH, level.as_str())?,
                None => api::fetch_text(&admin, api::EVENTS_PATH)?,
            };
            println!("datapath events: {now}");
            Ok(())
        }
        Command::Reset { bpffs } => {
            let removed =
                dataplane::reset(&bpffs).with_context(|| format!("reset {}", bpffs.display()))?;
            for path in &removed {
                println!("removed {}", path.display());
            }
            println!(
                "reset: {} pins removed; the datapath is detached",
                removed.len()
            );
            Ok(())
        }
    }
}

/// What `lb get` lists, and how.
struct List<'a> {
    admin: &'a str,
    namespace: &'a str,
    all_namespaces: bool,
    output: Option<Output>,
}

impl List<'_> {
    fn print<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        path: &str,
        namespace_of: fn(&T) -> &str,
        table: fn(&[T], bool, SystemTime) -> String,
    ) -> anyhow::Result<()> {
        let mut rows: Vec<T> = api::fetch(self.admin, path)?;
        rows.retain(|r| self.all_namespaces || namespace_of(r) == self.namespace);
        match self.output {
            Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&rows)?),
            None if rows.is_empty() && self.all_namespaces => eprintln!("No resources found"),
            None if rows.is_empty() => {
                eprintln!("No resources found in {} namespace.", self.namespace)
            }
            None => print!("{}", table(&rows, self.all_namespaces, SystemTime::now())),
        }
        Ok(())
    }
}
