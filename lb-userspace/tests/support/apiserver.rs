//! A stand-in for the Kubernetes API server that speaks its list/watch protocol over HTTP for
//! Services and EndpointSlices: lists with a resourceVersion, watches streaming
//! ADDED/MODIFIED/DELETED events and BOOKMARKs as JSON lines, a watch from a compacted
//! resourceVersion answered with a 410 Gone ERROR event, watches that can be cut, and a server
//! that can go down and come back on the same address. The agent reaches it with kube's
//! client through a generated kubeconfig.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::Bound,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
    serve::ListenerExt as _,
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// Where each kind lives on the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: no namespace.
    Node,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn of(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            other => panic!("the fake API server keeps Services and EndpointSlices, not {other:?}"),
        }
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    resource_version: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Objects {
    resource_version: u64,
    /// (kind, namespace, name) -> object with its metadata.resourceVersion, and its JSON
    /// text (as the real server's cache keeps it serialized: a list of 100,000 objects is
    /// then copied, not serialized again).
    current: BTreeMap<(Kind, String, String), (Value, String)>,
    /// Every change kept for watches, oldest first.
    history: Vec<WatchEvent>,
    /// Watches from before this resourceVersion are answered 410 Gone.
    compacted_before: u64,
}

struct Shared {
    objects: Mutex<Objects>,
    events: broadcast::Sender<WatchEvent>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    listener: Option<std::net::TcpListener>,
    runtime: tokio::runtime::Runtime,
    /// Ends the serving task.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeApiServer {
    /// Serves on `listener` (bound where the agent can reach it, e.g. in a node's namespace).
    pub fn start(listener: std::net::TcpListener) -> Self {
        let (events, _) = broadcast::channel(65_536);
        let (cut, _) = watch::channel(0);
        let addr = listener.local_addr().expect("listener address");
        let mut server = Self {
            shared: Arc::new(Shared {
                objects: Mutex::new(Objects {
                    resource_version: 1000,
                    ..Default::default()
                }),
                events,
                cut,
            }),
            addr,
            listener: Some(listener),
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
            stop: None,
        };
        server.serve();
        server
    }

    fn serve(&mut self) {
        let listener = self.listener.take().expect("a listener to serve on");
        listener.set_nonblocking(true).expect("nonblocking");
        let app = Router::new()
            .route("/api/v1/services", get(services))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(slices))
            .route("/api/v1/nodes", get(nodes))
            .with_state(self.shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        let _guard = self.runtime.enter();
        // As the real API server (Go sets TCP_NODELAY on every connection): without it a
        // watch event written behind an unacknowledged one waits for the client's delayed ACK.
        let listener = tokio::net::TcpListener::from_std(listener)
            .expect("tokio listener")
            .tap_io(|stream| {
                let _ = stream.set_nodelay(true);
            });
        self.runtime.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server, written into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (a Service or an EndpointSlice as JSON).
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object);
        let namespace = match kind {
            Kind::Node => String::new(),
            _ => object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
        };
        let key = (
            kind,
            namespace,
            object["metadata"]["name"]
                .as_str()
                .expect("metadata.name")
                .to_string(),
        );
        if kind != Kind::Node {
            object["metadata"]["namespace"] = json!(key.1);
        }
        let mut objects = self.shared.objects.lock().unwrap();
        objects.resource_version += 1;
        let rv = objects.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind_of_event = if objects.current.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let text = object.to_string();
        objects.current.insert(key, (object.clone(), text));
        self.record(&mut objects, kind, kind_of_event, object);
    }

    /// Deletes an object, if present.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut objects = self.shared.objects.lock().unwrap();
        let Some((mut object, _)) =
            objects
                .current
                .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return;
        };
        objects.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(objects.resource_version.to_string());
        self.record(&mut objects, kind, "DELETED", object);
    }

    fn record(
        &self,
        objects: &mut Objects,
        kind: Kind,
        kind_of_event: &'static str,
        object: Value,
    ) {
        let event = WatchEvent {
            resource_version: objects.resource_version,
            kind,
            kind_of_event,
            object,
        };
        objects.history.push(event.clone());
        let _ = self.shared.events.send(event);
    }

    /// Forgets the history: watches that resume from before now get 410 Gone and must relist.
    pub fn compact(&self) {
        let mut objects = self.shared.objects.lock().unwrap();
        objects.compacted_before = objects.resource_version + 1;
        objects.history.clear();
    }

    /// Ends every open watch, as a dropped connection or an API server restart would.
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Stops serving: connections are refused until [`Self::up`].
    pub fn down(&mut self) {
        self.cut_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Give the server its moment to close the listening socket.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Serves again on the same address, from `listener` bound to it.
    pub fn up(&mut self, listener: std::net::TcpListener) {
        assert_eq!(listener.local_addr().unwrap(), self.addr, "same address");
        self.listener = Some(listener);
        self.serve();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.cut_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The query parameters of a list or watch that this server looks at.
struct ListOptions {
    watch: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    limit: Option<usize>,
    /// Where the page starts: after this (namespace, name), this server's continue token. As the
    /// real server's, it names the last key sent, so that a page costs the same wherever it
    /// starts.
    continue_after: Option<(String, String)>,
}

impl ListOptions {
    fn parse(query: Option<String>) -> Self {
        let query = query.unwrap_or_default();
        let value = |key: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        Self {
            watch: value("watch"),
            resource_version: value("resourceVersion"),
            timeout_seconds: value("timeoutSeconds").and_then(|v| v.parse().ok()),
            limit: value("limit").and_then(|v| v.parse().ok()),
            continue_after: value("continue").and_then(|token| {
                let (namespace, name) = token.split_once('/')?;
                Some((namespace.to_string(), name.to_string()))
            }),
        }
    }
}

async fn services(state: State<Arc<Shared>>, query: RawQuery) -> Response {
    list_or_watch(Kind::Service, state.0, ListOptions::parse(query.0)).await
}

async fn slices(state: State<Arc<Shared>>, query: RawQuery) -> Response {
    list_or_watch(Kind::EndpointSlice, state.0, ListOptions::parse(query.0)).await
}

/// Every Node (the field selector on the name is not applied: tests have one node).
async fn nodes(state: State<Arc<Shared>>, query: RawQuery) -> Response {
    list_or_watch(Kind::Node, state.0, ListOptions::parse(query.0)).await
}

fn json_response(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn list_or_watch(kind: Kind, shared: Arc<Shared>, options: ListOptions) -> Response {
    let watching = matches!(options.watch.as_deref(), Some("true" | "1"));
    if !watching {
        // As the real server: a list at resourceVersion 0 comes whole from its cache; other
        // lists come in pages of `limit` with a continue token.
        let paged = options.resource_version.as_deref() != Some("0");
        let start = match options.continue_after {
            Some((namespace, name)) => Bound::Excluded((kind, namespace, name)),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let limit = options.limit.filter(|_| paged).unwrap_or(usize::MAX);
        let objects = shared.objects.lock().unwrap();
        let mut matching = objects
            .current
            .range((start, Bound::Unbounded))
            .take_while(|((k, _, _), _)| *k == kind)
            .peekable();
        let mut items: Vec<&str> = Vec::new();
        let mut last = None;
        while items.len() < limit
            && let Some(((_, namespace, name), (_, text))) = matching.next()
        {
            items.push(text);
            last = Some((namespace, name));
        }
        let mut metadata = json!({"resourceVersion": objects.resource_version.to_string()});
        if let (Some((namespace, name)), Some(_)) = (last, matching.peek()) {
            metadata["continue"] = json!(format!("{namespace}/{name}"));
        }
        let head = json!({
            "kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": metadata,
        })
        .to_string();
        // The head without its closing brace, then the items' stored text.
        let mut body = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 64);
        body.push_str(&head[..head.len() - 1]);
        body.push_str(",\"items\":[");
        body.push_str(&items.join(","));
        body.push_str("]}");
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let from: u64 = match options.resource_version.as_deref().map(str::parse) {
        Some(Ok(rv)) => rv,
        _ => return (StatusCode::BAD_REQUEST, "watch needs a resourceVersion").into_response(),
    };
    // Subscribed before the history is read, so nothing falls between the two.
    let mut live = shared.events.subscribe();
    let mut cut = shared.cut.subscribe();
    let (backlog, expired, now) = {
        let objects = shared.objects.lock().unwrap();
        let backlog: Vec<WatchEvent> = objects
            .history
            .iter()
            .filter(|e| e.kind == kind && e.resource_version > from)
            .cloned()
            .collect();
        (
            backlog,
            from < objects.compacted_before.saturating_sub(1),
            objects.resource_version,
        )
    };
    let timeout = Duration::from_secs(options.timeout_seconds.unwrap_or(300));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1024);
    tokio::spawn(async move {
        let line = |e: &WatchEvent| {
            json!({"type": e.kind_of_event, "object": e.object}).to_string() + "\n"
        };
        if expired {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({now})"),
                "reason": "Expired", "code": 410}});
            let _ = tx.send(Ok(gone.to_string() + "\n")).await;
            return;
        }
        let mut sent_up_to = from;
        for e in &backlog {
            sent_up_to = e.resource_version;
            if tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok(e) if e.kind == kind && e.resource_version > sent_up_to => {
                        sent_up_to = e.resource_version;
                        if tx.send(Ok(line(&e))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = bookmark.tick() => {
                    // Only as far as sent: a later mark could skip an event still on its way.
                    let rv = sent_up_to;
                    let mark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(),
                        "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(Ok(mark.to_string() + "\n")).await.is_err() {
                        return;
                    }
                }
                _ = cut.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream_from(rx));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The receiving end of a channel as a stream of body chunks.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<String, std::io::Error>>,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
