//! Cluster mode: Services and EndpointSlices watched on the API server with kube's runtime
//! watchers (paged lists, watches resumed from their last resourceVersion or relisted after 410
//! Gone, backoff), turned into the same control-plane changes the manifest folder gives. The
//! control plane's model is the only copy of the objects the agent keeps: a reflector store
//! beside it would hold every object a second time (about 4 KiB per Service with 10 endpoints,
//! a third of the agent's memory). A relist (at start, after a broken or expired watch) upserts what it
//! finds and deletes only what is gone: the maps are never flushed.
use foldhash::{HashSet, HashSetExt as _};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    controlplane::Change,
    model::{self, Object, ObjectName},
};

/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label get no proxying (kube-proxy skips them too).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// When the change an EndpointSlice reflects began (set by the EndpointSlice controller).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// During the first list, changes go to the agent in chunks of this many objects: it takes them
/// in while the rest are converted (and writes nothing before both kinds are listed).
const FIRST_LIST_CHUNK: usize = 4096;

/// What the watchers report to the agent.
#[derive(Debug)]
pub enum Update {
    /// Changes to apply, in order, and the times their EndpointSlices say the endpoint
    /// changes began (for the network programming latency).
    Changes {
        changes: Vec<Change>,
        triggers: Vec<std::time::SystemTime>,
    },
    /// A kind finished a (re)list: its objects are all known from here on.
    Listed(&'static str),
    /// This node's zone (its `topology.kubernetes.io/zone` label), as it is now.
    Zone(Option<String>),
    /// An object that cannot be used (the version before it stays in force), or (`None`) that
    /// can again.
    Problem {
        object: String,
        problem: Option<String>,
    },
}

/// Starts watching Services and EndpointSlices in every namespace, and the Node `node_name`.
/// Watches retry with backoff for as long as the agent runs, an unreachable API server
/// included.
pub fn watch(client: Client, node_name: &str, tx: mpsc::UnboundedSender<Update>) {
    let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream =
        watcher::watcher(Api::<core::Node>::all(client.clone()), node_config).default_backoff();
    tokio::spawn(forward_zone(stream, tx.clone()));
    // Lists come in pages of 500 (kube's default, as client-go's), each decoded and converted
    // as it arrives: 100,000 EndpointSlices are never one 150 MB body. With a page size kube
    // sends no resourceVersion, so the API server serves a consistent list.
    let config = watcher::Config::default();
    let stream = watcher::watcher(Api::<core::Service>::all(client.clone()), config.clone())
        .default_backoff();
    tokio::spawn(forward("Service", stream, convert_service, tx.clone()));
    let stream =
        watcher::watcher(Api::<discovery::EndpointSlice>::all(client), config).default_backoff();
    tokio::spawn(forward("EndpointSlice", stream, convert_slice, tx));
}

/// Reports this node's zone whenever its Node object says something new about it.
async fn forward_zone<S>(stream: S, tx: mpsc::UnboundedSender<Update>)
where
    S: futures::Stream<Item = Result<Event<core::Node>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut reported: Option<Option<String>> = None;
    while let Some(event) = stream.next().await {
        let zone = match event {
            Ok(Event::Apply(node) | Event::InitApply(node)) => {
                node.labels().get(ZONE_LABEL).cloned()
            }
            Ok(Event::Delete(_)) => None,
            Ok(Event::Init | Event::InitDone) => continue,
            Err(e) => {
                warn!("watching this node's Node: {e}");
                continue;
            }
        };
        if reported.as_ref() != Some(&zone) {
            reported = Some(zone.clone());
            let _ = tx.send(Update::Zone(zone));
        }
    }
}

/// What a watched object becomes: an upsert, a delete (a Service another proxy owns), or a
/// problem.
type Converted = Result<Option<Object>, String>;

fn convert_service(svc: &core::Service) -> Converted {
    let proxied = proxied(svc);
    let mut service = match model::service(svc) {
        Ok(service) => service,
        // Another proxy's Service is not ours to judge.
        Err(_) if !proxied => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    service.proxied = proxied;
    // Endpoints come from EndpointSlices, which the cluster's controller keeps for Services
    // with a selector too: the control plane must not look for Pods.
    service.selector = None;
    Ok(Some(Object::Service(service)))
}

/// Whether kube-proxy would proxy this Service.
pub fn proxied(svc: &core::Service) -> bool {
    let labels = svc.labels();
    !labels.contains_key(SERVICE_PROXY_NAME_LABEL) && !labels.contains_key(HEADLESS_LABEL)
}

fn convert_slice(slice: &discovery::EndpointSlice) -> Converted {
    // IPv6 slices are not served yet: they are not an error.
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let endpoints = model::endpoint_slice(slice).map_err(|e| e.to_string())?;
    Ok(Some(Object::EndpointSlice(endpoints)))
}

fn name_of<K: Resource>(object: &K) -> ObjectName {
    ObjectName {
        namespace: object.meta().namespace.clone().unwrap_or_default(),
        name: object.meta().name.clone().unwrap_or_default(),
    }
}

/// Turns one kind's watch events into updates for the agent.
async fn forward<K, S>(
    kind: &'static str,
    stream: S,
    convert: fn(&K) -> Converted,
    tx: mpsc::UnboundedSender<Update>,
) where
    K: Resource,
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    // Objects of this kind the agent holds, and those a relist in progress has not found yet
    // (none on the first list: it has nothing to look for).
    let mut known: HashSet<ObjectName> = HashSet::new();
    let mut unseen: Option<HashSet<ObjectName>> = None;
    // Objects with a problem reported.
    let mut troubled: HashSet<ObjectName> = HashSet::new();
    let mut changes = Vec::new();
    let mut triggers = Vec::new();
    let mut first_list = true;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                // The backoff retries; the maps stay as they are meanwhile.
                warn!("watching {kind}s: {e}");
                continue;
            }
        };
        // Problems found or cleared by this event: (object, problem).
        let mut problems: Vec<(ObjectName, Option<String>)> = Vec::new();
        let mut upsert = |object: &K, changes: &mut Vec<Change>, known: &mut HashSet<_>| {
            let name = name_of(object);
            match convert(object) {
                Ok(Some(converted)) => {
                    if troubled.contains(&name) {
                        problems.push((name.clone(), None));
                    }
                    known.insert(name);
                    changes.push(Change::Upsert(converted));
                }
                Ok(None) => {
                    if troubled.contains(&name) {
                        problems.push((name.clone(), None));
                    }
                    if known.remove(&name) {
                        changes.push(Change::Delete((kind, name)));
                    }
                }
                Err(problem) => {
                    // Kept: the version before it stays in force.
                    known.insert(name.clone());
                    problems.push((name, Some(problem)));
                }
            }
        };
        match event {
            Event::Init => unseen = Some(known.clone()),
            Event::InitApply(object) => {
                let unseen = unseen.get_or_insert_with(|| known.clone());
                if !unseen.is_empty() {
                    unseen.remove(&name_of(&object));
                }
                upsert(&object, &mut changes, &mut known);
            }
            Event::InitDone => {
                for name in unseen.take().unwrap_or_default() {
                    known.remove(&name);
                    changes.push(Change::Delete((kind, name)));
                }
                send_changes(&tx, &mut changes, &mut triggers);
                let _ = tx.send(Update::Listed(kind));
                first_list = false;
                continue;
            }
            Event::Apply(object) => {
                triggers.extend(trigger_time(&object));
                upsert(&object, &mut changes, &mut known)
            }
            Event::Delete(object) => {
                let name = name_of(&object);
                if troubled.contains(&name) {
                    problems.push((name.clone(), None));
                }
                if known.remove(&name) {
                    changes.push(Change::Delete((kind, name)));
                }
            }
        }
        for (name, problem) in problems {
            let reported = troubled.contains(&name);
            match problem {
                Some(_) => {
                    troubled.insert(name.clone());
                }
                None if reported => {
                    troubled.remove(&name);
                }
                None => continue,
            }
            let object = format!("{kind} {}/{}", name.namespace, name.name);
            let _ = tx.send(Update::Problem { object, problem });
        }
        // During a relist, changes wait for its end: a half-listed kind is never programmed.
        // The first list's may go before, since nothing is programmed until it ends.
        if unseen.is_none() || (first_list && changes.len() >= FIRST_LIST_CHUNK) {
            send_changes(&tx, &mut changes, &mut triggers);
        }
    }
}

fn send_changes(
    tx: &mpsc::UnboundedSender<Update>,
    changes: &mut Vec<Change>,
    triggers: &mut Vec<std::time::SystemTime>,
) {
    if !changes.is_empty() {
        let _ = tx.send(Update::Changes {
            changes: std::mem::take(changes),
            triggers: std::mem::take(triggers),
        });
    }
}

/// The time an object's trigger annotation gives, if any.
fn trigger_time<K: Resource>(object: &K) -> Option<std::time::SystemTime> {
    let text = object
        .meta()
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    humantime::parse_rfc3339_weak(text).ok()
}
