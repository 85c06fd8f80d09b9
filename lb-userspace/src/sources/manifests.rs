//! The manifest folder of standalone mode: parse files into objects, keeping the last good
//! version of whatever a broken file or object would otherwise take away.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, btree_map::Entry},
    fmt,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    controlplane::Change,
    model::{self, FieldError, Object, ObjectKey},
};

/// A problem with one file, document or object. The rest of the folder still applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number in a multi-document file.
    pub document: Option<usize>,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Objects and per-object errors of one file, or the error that makes the whole file unusable.
pub type ParsedFile = Result<Vec<Result<Object, ManifestError>>, ManifestError>;

pub fn parse_file(path: &Path, text: &str) -> ParsedFile {
    let err = |document: Option<usize>, message: String| ManifestError {
        file: path.to_path_buf(),
        document,
        object: None,
        field: None,
        message,
    };
    let documents: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(text).map_err(|e| err(None, format!("invalid JSON: {e}")))?]
    } else {
        let mut docs = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            docs.push(
                Value::deserialize(doc)
                    .map_err(|e| err(Some(i + 1), format!("invalid YAML: {e}")))?,
            );
        }
        docs
    };
    let numbered = documents.len() > 1;
    let mut objects = Vec::new();
    for (i, doc) in documents.into_iter().enumerate() {
        let document = numbered.then_some(i + 1);
        collect_objects(path, document, doc, &mut objects)?;
    }
    Ok(objects)
}

fn collect_objects(
    path: &Path,
    document: Option<usize>,
    doc: Value,
    out: &mut Vec<Result<Object, ManifestError>>,
) -> Result<(), ManifestError> {
    if doc.is_null() {
        return Ok(());
    }
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let label = object_label(&kind, &doc);
    let error = |field: Option<String>, message: String| ManifestError {
        file: path.to_path_buf(),
        document,
        object: label.clone(),
        field,
        message,
    };
    // A document that does not deserialize at all makes the whole file unusable: its other
    // objects' last good versions stay in force, rather than half a file.
    fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(doc)
            .map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }
    let fatal = |(field, message): (String, String)| error(Some(field), message);
    let invalid = |e: FieldError| error(Some(e.field), e.message);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            // Taken, not copied: a List can hold every object of a large cluster.
            let items = match doc {
                Value::Object(mut fields) => fields.remove("items"),
                _ => None,
            };
            if let Some(Value::Array(items)) = items {
                for item in items {
                    collect_objects(path, document, item, out)?;
                }
            }
        }
        ("v1", "Service") => {
            let svc: core::Service = typed(doc).map_err(fatal)?;
            out.push(model::service(&svc).map(Object::Service).map_err(invalid));
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(doc).map_err(fatal)?;
            out.push(model::pod(&pod).map(Object::Pod).map_err(invalid));
        }
        ("v1", "Endpoints") => {
            let ep: core::Endpoints = typed(doc).map_err(fatal)?;
            out.push(model::endpoints(&ep).map(Object::Endpoints).map_err(invalid));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: discovery::EndpointSlice = typed(doc).map_err(fatal)?;
            out.push(model::endpoint_slice(&slice).map(Object::EndpointSlice).map_err(invalid));
        }
        ("", _) => return Err(error(Some("apiVersion".into()), "Required value".into())),
        (_, "") => return Err(error(Some("kind".into()), "Required value".into())),
        (v, k) => out.push(Err(error(
            Some("kind".into()),
            format!("{v} {k} is not one of v1 Service, Pod, Endpoints, List or discovery.k8s.io/v1 EndpointSlice: ignored"),
        ))),
    }
    Ok(())
}

fn object_label(kind: &str, doc: &Value) -> Option<String> {
    let meta = doc.get("metadata")?;
    let name = meta.get("name").and_then(Value::as_str)?;
    let ns = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    Some(format!("{kind} {ns}/{name}"))
}

/// What the store remembers of one file.
#[derive(Clone, Default)]
struct FileEntry {
    /// Hash of the text its objects were last taken from; `None` after it failed to read or
    /// parse, so that it is parsed again next time.
    text_hash: Option<u64>,
    /// The objects it defines.
    keys: BTreeSet<ObjectKey>,
    /// The problems found when it was last read (including that it could not be read or
    /// parsed): reported while it stays as it is.
    errors: Vec<ManifestError>,
    /// How the file looked when that text was read from the folder: while it looks the same,
    /// it is not read again.
    stamp: Option<FileStamp>,
}

/// Device, inode, size and change times of a file: a write changes at least one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp([i64; 7]);

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self([
            meta.dev() as i64,
            meta.ino() as i64,
            meta.size() as i64,
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        ])
    }
}

/// How long ago a file must have been modified for its stamp to be trusted.
const STAMP_SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

/// A manifest file's content as read now.
enum FileRead {
    Text(String),
    /// It could not be read (why).
    Unreadable(String),
}

/// What is at a path of the folder now.
enum Found {
    /// No manifest file (anymore).
    Absent,
    /// The file looks as it did when its text was last taken in: not read again.
    Unchanged,
    /// Read, with the stamp to remember if its text is taken in (`None`: too fresh to trust).
    Read(FileRead, Option<FileStamp>),
}

/// A manifest folder as a stream of changes to the objects in force. The store keeps no
/// objects, only which file defines which: the objects live in whoever takes the changes, and
/// a change not sent keeps the previous version there. So a file that fails to parse keeps its
/// previous objects; an invalid object keeps its previous version; an object defined twice
/// keeps the first file's definition (in folder order).
#[derive(Clone, Default)]
pub struct ManifestStore {
    files: BTreeMap<PathBuf, FileEntry>,
    /// Files defining each object, in folder order: the first one's definition is in force.
    definers: HashMap<ObjectKey, Vec<PathBuf>>,
    /// Files the last update had to parse (0: every file was as before), and their bytes.
    parsed: usize,
    parsed_bytes: usize,
    /// How the objects in force changed since `take_changes` was last called.
    changes: Vec<Change>,
}

fn text_hash(text: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl ManifestStore {
    /// Scans `dir`: every manifest file directly in it, reading only those that changed since
    /// their text was last taken in; a file no longer there is gone. Returns the problems
    /// found in the folder.
    pub fn update_from_folder(&mut self, dir: &Path) -> std::io::Result<Vec<ManifestError>> {
        let now = std::time::SystemTime::now();
        let mut reads = BTreeMap::new();
        let mut present = HashSet::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            match self.look(&path, now) {
                Found::Absent => continue,
                Found::Unchanged => {}
                Found::Read(read, stamp) => {
                    reads.insert(path.clone(), (read, stamp));
                }
            }
            present.insert(path);
        }
        let gone = self.known_files_except(|path| present.contains(path));
        Ok(self.take_in(reads, gone))
    }

    /// Looks at these paths of the folder only (what a watcher reported changed): each is
    /// read if it changed, or gone if it is no longer a manifest file. Returns the problems
    /// found in the folder.
    pub fn update_paths(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Vec<ManifestError> {
        let now = std::time::SystemTime::now();
        let mut reads = BTreeMap::new();
        let mut gone = Vec::new();
        for path in paths {
            match self.look(&path, now) {
                Found::Absent if self.files.contains_key(&path) => gone.push(path),
                Found::Absent | Found::Unchanged => {}
                Found::Read(read, stamp) => {
                    reads.insert(path, (read, stamp));
                }
            }
        }
        self.take_in(reads, gone)
    }

    /// Takes in the current content of every file (a file not listed is gone) and returns the
    /// problems found in the folder.
    pub fn update(
        &mut self,
        files: BTreeMap<PathBuf, Result<String, String>>,
    ) -> Vec<ManifestError> {
        let gone = self.known_files_except(|path| files.contains_key(path));
        let reads = files
            .into_iter()
            .map(|(path, content)| {
                let read = match content {
                    Ok(text) => FileRead::Text(text),
                    Err(e) => FileRead::Unreadable(e),
                };
                (path, (read, None))
            })
            .collect();
        self.take_in(reads, gone)
    }

    fn known_files_except(&self, keep: impl Fn(&PathBuf) -> bool) -> Vec<PathBuf> {
        self.files.keys().filter(|p| !keep(p)).cloned().collect()
    }

    fn look(&self, path: &Path, now: std::time::SystemTime) -> Found {
        // Follows symlinks, as reading does.
        let Ok(meta) = std::fs::metadata(path) else {
            return Found::Absent;
        };
        if !meta.is_file() || !is_manifest(path) {
            return Found::Absent;
        }
        // Stamped before reading: a write during the read changes the stamp again. File times
        // tick in jiffies, so a second write of the same size within one tick of a read would
        // keep the stamp: a file modified less than a second ago is not trusted to stay.
        let stamp = FileStamp::of(&meta);
        if self.files.get(path).and_then(|e| e.stamp) == Some(stamp) {
            return Found::Unchanged;
        }
        let settled = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= STAMP_SETTLED);
        let read = match std::fs::read_to_string(path) {
            Ok(text) => FileRead::Text(text),
            Err(e) => FileRead::Unreadable(e.to_string()),
        };
        Found::Read(read, settled.then_some(stamp))
    }

    /// Takes in new content of some files and the files gone; every other file stays as it
    /// was. Returns the problems of the whole folder.
    fn take_in(
        &mut self,
        reads: BTreeMap<PathBuf, (FileRead, Option<FileStamp>)>,
        gone: Vec<PathBuf>,
    ) -> Vec<ManifestError> {
        // Objects whose file in force lost them: another file's definition may take over.
        let mut orphaned: BTreeSet<ObjectKey> = BTreeSet::new();
        for path in gone {
            let entry = self.files.remove(&path).unwrap_or_default();
            for key in entry.keys {
                self.undefine(&path, key, &mut orphaned);
            }
        }
        self.parsed = 0;
        self.parsed_bytes = 0;
        let mut fresh: Vec<(PathBuf, Object)> = Vec::new();
        for (path, (read, stamp)) in &reads {
            let mut entry = self.files.remove(path).unwrap_or_default();
            match read {
                FileRead::Text(text) => {
                    let hash = text_hash(text);
                    if entry.text_hash != Some(hash) {
                        self.parsed += 1;
                        self.parsed_bytes += text.len();
                        entry.text_hash = None;
                        match parse_file(path, text) {
                            // A file that does not parse keeps its previous objects: nothing
                            // is sent.
                            Err(e) => entry.errors = vec![e],
                            Ok(results) => {
                                let (objects, errors) = file_objects(path, results, &entry.keys);
                                let keys: BTreeSet<ObjectKey> = objects.keys().cloned().collect();
                                for key in entry.keys.difference(&keys) {
                                    self.undefine(path, key.clone(), &mut orphaned);
                                }
                                for (key, object) in objects {
                                    let definers = self.definers.entry(key).or_default();
                                    if let Err(at) = definers.binary_search(path) {
                                        definers.insert(at, path.clone());
                                    }
                                    if let Some(object) = object {
                                        fresh.push((path.clone(), object));
                                    }
                                }
                                entry.keys = keys;
                                entry.errors = errors;
                                entry.text_hash = Some(hash);
                            }
                        }
                    }
                }
                FileRead::Unreadable(e) => {
                    self.parsed += 1;
                    entry.text_hash = None;
                    entry.errors = vec![ManifestError {
                        file: path.clone(),
                        document: None,
                        object: None,
                        field: None,
                        message: format!("cannot read: {e}"),
                    }];
                }
            }
            // Only a text taken in whole is trusted to stay: a broken file is read every time.
            entry.stamp = entry.text_hash.and(*stamp);
            self.files.insert(path.clone(), entry);
        }
        for (path, object) in fresh {
            let key = object.key();
            orphaned.remove(&key);
            if self.in_force(&key) == Some(&path) {
                self.changes.push(Change::Upsert(object));
            }
        }
        self.take_over(orphaned, &reads);
        let mut errors: Vec<ManifestError> = self
            .files
            .values()
            .flat_map(|entry| entry.errors.iter().cloned())
            .collect();
        // Kind/namespace/name must be unique across the folder.
        for (key, paths) in &self.definers {
            for path in &paths[1..] {
                errors.push(ManifestError {
                    file: path.clone(),
                    document: None,
                    object: Some(format!("{} {}", key.0, key.1)),
                    field: Some("metadata.name".into()),
                    message: format!("Duplicate value: already defined in {}", paths[0].display()),
                });
            }
        }
        errors
    }

    /// `path` no longer defines `key`; if it was the definition in force, `key` is orphaned.
    fn undefine(&mut self, path: &Path, key: ObjectKey, orphaned: &mut BTreeSet<ObjectKey>) {
        let Some(definers) = self.definers.get_mut(&key) else {
            return;
        };
        if definers.first().is_some_and(|first| first == path) {
            orphaned.insert(key.clone());
        }
        definers.retain(|p| p != path);
        if definers.is_empty() {
            self.definers.remove(&key);
        }
    }

    /// Each orphaned object is deleted, or taken from the next file that defines it (parsed
    /// again for that: it was a duplicate until now, so nothing holds its version).
    fn take_over(
        &mut self,
        orphaned: BTreeSet<ObjectKey>,
        reads: &BTreeMap<PathBuf, (FileRead, Option<FileStamp>)>,
    ) {
        let mut by_file: BTreeMap<PathBuf, Vec<ObjectKey>> = BTreeMap::new();
        for key in orphaned {
            match self.in_force(&key) {
                Some(path) => by_file.entry(path.clone()).or_default().push(key),
                None => self.changes.push(Change::Delete(key)),
            }
        }
        for (path, keys) in by_file {
            let text = match reads.get(&path) {
                Some((FileRead::Text(text), _)) => text.clone(),
                Some((FileRead::Unreadable(_), _)) => continue,
                None => match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(_) => continue,
                },
            };
            let objects = parse_file(&path, &text).unwrap_or_default();
            for object in objects.into_iter().flatten() {
                if keys.contains(&object.key()) {
                    self.changes.push(Change::Upsert(object));
                }
            }
        }
    }

    fn in_force(&self, key: &ObjectKey) -> Option<&PathBuf> {
        self.definers.get(key)?.first()
    }

    /// How the objects in force changed since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// How many files the last update parsed; 0 when none had changed.
    pub fn parsed_last_update(&self) -> usize {
        self.parsed
    }

    /// How many bytes of text the last update parsed.
    pub fn parsed_bytes_last_update(&self) -> usize {
        self.parsed_bytes
    }
}

/// The objects of a parsed file by key, and its problems. An invalid object that the file
/// defined before stays defined without a new version (`None`): its previous version stays in
/// force. An object defined twice in the file keeps its first definition.
fn file_objects(
    path: &Path,
    results: Vec<Result<Object, ManifestError>>,
    previous: &BTreeSet<ObjectKey>,
) -> (BTreeMap<ObjectKey, Option<Object>>, Vec<ManifestError>) {
    let mut objects = BTreeMap::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(object) => match objects.entry(object.key()) {
                Entry::Occupied(first) => errors.push(ManifestError {
                    file: path.to_path_buf(),
                    document: None,
                    object: Some(format!("{} {}", first.key().0, first.key().1)),
                    field: Some("metadata.name".into()),
                    message: "Duplicate value: already defined in this file".into(),
                }),
                Entry::Vacant(slot) => {
                    slot.insert(Some(object));
                }
            },
            Err(e) => {
                let kept = e.object.as_ref().and_then(|label| {
                    previous
                        .iter()
                        .find(|k| format!("{} {}", k.0, k.1) == *label)
                });
                if let Some(key) = kept {
                    objects.entry(key.clone()).or_insert(None);
                }
                errors.push(e);
            }
        }
    }
    (objects, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, labels: {app: web}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.1.2}\n";

    /// A store with the objects its changes leave in force, as the control plane holds them.
    #[derive(Default)]
    struct Folder {
        store: ManifestStore,
        objects: BTreeMap<ObjectKey, Object>,
    }

    impl Folder {
        fn update(
            &mut self,
            files: BTreeMap<PathBuf, Result<String, String>>,
        ) -> Vec<ManifestError> {
            let errors = self.store.update(files);
            for change in self.store.take_changes() {
                match change {
                    Change::Upsert(object) => {
                        self.objects.insert(object.key(), object);
                    }
                    Change::Delete(key) => {
                        self.objects.remove(&key);
                    }
                }
            }
            errors
        }

        fn objects(&self) -> impl Iterator<Item = &Object> {
            self.objects.values()
        }

        fn parsed_last_update(&self) -> usize {
            self.store.parsed_last_update()
        }
    }

    fn files(entries: &[(&str, &str)]) -> BTreeMap<PathBuf, Result<String, String>> {
        entries
            .iter()
            .map(|(p, t)| (PathBuf::from(p), Ok(t.to_string())))
            .collect()
    }

    #[test]
    fn multi_document_yaml_list_and_json() {
        let multi = format!("{SVC}---\n{POD}---\n");
        let objs = parse_file(Path::new("a.yaml"), &multi).unwrap();
        assert_eq!(objs.len(), 2);
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
        let objs = parse_file(Path::new("b.json"), json).unwrap();
        assert!(matches!(&objs[0], Ok(Object::Service(s)) if s.id.name == "j"));
    }

    #[test]
    fn type_errors_name_file_document_and_field() {
        let bad = format!(
            "{POD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  ports: [{{port: eighty}}]\n"
        );
        let err = parse_file(Path::new("dir/bad.yaml"), &bad).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("dir/bad.yaml: document 2: Service default/web: spec.ports[0].port: "),
            "{text}"
        );
    }

    #[test]
    fn broken_file_keeps_previous_objects() {
        let mut store = Folder::default();
        assert!(
            store
                .update(files(&[("a.yaml", SVC), ("b.yaml", POD)]))
                .is_empty()
        );
        let errors = store.update(files(&[("a.yaml", "kind: [unclosed"), ("b.yaml", POD)]));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, PathBuf::from("a.yaml"));
        assert_eq!(
            store.objects().count(),
            2,
            "the broken file's service stays"
        );
    }

    #[test]
    fn invalid_object_keeps_its_previous_version_only() {
        let mut store = Folder::default();
        let two = format!("{SVC}---\n{POD}");
        assert!(store.update(files(&[("a.yaml", &two)])).is_empty());
        let broken = two
            .replace("ports: [{port: 80}]", "ports: [{port: 0}]")
            .replace("p1", "p2");
        let errors = store.update(files(&[("a.yaml", &broken)]));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field.as_deref(), Some("spec.ports[0].port"));
        let mut names: Vec<String> = store.objects().map(|o| o.id().name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["p2", "web"],
            "new pod applied, old service kept"
        );
    }

    #[test]
    fn unchanged_files_are_not_parsed_again_but_keep_reporting_problems() {
        let mut store = Folder::default();
        let bad = SVC.replace("port: 80", "port: 0");
        let first = store.update(files(&[("a.yaml", POD), ("b.yaml", &bad)]));
        let second = store.update(files(&[("a.yaml", POD), ("b.yaml", &bad)]));
        assert_eq!(first.len(), 1);
        assert_eq!(first, second);
        assert_eq!(
            store.parsed_last_update(),
            0,
            "nothing changed, nothing parsed"
        );
        assert_eq!(store.objects().count(), 1);
        assert!(
            store
                .update(files(&[("a.yaml", POD), ("b.yaml", SVC)]))
                .is_empty()
        );
        assert_eq!(store.objects().count(), 2);
    }

    #[test]
    fn deleted_file_removes_its_objects_and_duplicates_are_rejected() {
        let mut store = Folder::default();
        let errors = store.update(files(&[("a.yaml", SVC), ("b.yaml", SVC)]));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, PathBuf::from("b.yaml"));
        assert!(errors[0].message.contains("a.yaml"));
        assert_eq!(store.objects().count(), 1);
        store.update(files(&[]));
        assert_eq!(store.objects().count(), 0);
    }

    fn kinds_and_names(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(o) => format!("upsert {} {}", o.kind(), o.id().name),
                Change::Delete((kind, id)) => format!("delete {kind} {}", id.name),
            })
            .collect()
    }

    #[test]
    fn changes_carry_the_definitions_in_force() {
        let mut store = ManifestStore::default();
        store.update(files(&[("a.yaml", &format!("{SVC}---\n{POD}"))]));
        assert_eq!(
            kinds_and_names(&store.take_changes()),
            ["upsert Pod p1", "upsert Service web"]
        );
        store.update(files(&[("a.yaml", &format!("{SVC}---\n{POD}"))]));
        assert!(store.take_changes().is_empty(), "same text, no change");
        let moved = POD.replace("198.18.1.2", "198.18.1.3");
        let other_port = SVC.replace("port: 80", "port: 81");
        store.update(files(&[
            ("a.yaml", &format!("{SVC}---\n{moved}")),
            ("b.yaml", &other_port),
        ]));
        // Every object of a file parsed again is sent (the taker ignores equal versions), but
        // only in the version in force: b.yaml's web is a duplicate.
        let changes = store.take_changes();
        assert_eq!(
            kinds_and_names(&changes),
            ["upsert Pod p1", "upsert Service web"]
        );
        assert!(matches!(&changes[1], Change::Upsert(Object::Service(s)) if s.ports[0].port == 80));
        // a.yaml drops its web: b.yaml's definition comes into force.
        store.update(files(&[("a.yaml", &moved), ("b.yaml", &other_port)]));
        let changes = store.take_changes();
        assert_eq!(
            kinds_and_names(&changes),
            ["upsert Pod p1", "upsert Service web"]
        );
        assert!(matches!(&changes[1], Change::Upsert(Object::Service(s)) if s.ports[0].port == 81));
        store.update(files(&[]));
        assert_eq!(
            kinds_and_names(&store.take_changes()),
            ["delete Pod p1", "delete Service web"]
        );
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A file last modified long enough ago is stamped and then not read again; a write that
    /// keeps its size and even puts its modification time back still changes the stamp.
    #[test]
    fn settled_files_are_not_read_again_until_they_change() {
        let dir = TempDir::new("stamps");
        let path = dir.0.join("b.yaml");
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let write = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(long_ago).unwrap();
        };
        write(POD);
        let mut store = ManifestStore::default();
        store.update_from_folder(&dir.0).unwrap();
        assert_eq!(store.parsed_bytes_last_update(), POD.len());
        assert!(
            store.files[&path].stamp.is_some(),
            "settled file is stamped"
        );
        store.update_from_folder(&dir.0).unwrap();
        assert_eq!(store.parsed_bytes_last_update(), 0);
        store.take_changes();
        write(&POD.replace("198.18.1.2", "198.18.1.3"));
        store.update_from_folder(&dir.0).unwrap();
        assert_eq!(kinds_and_names(&store.take_changes()), ["upsert Pod p1"]);
    }

    #[test]
    fn folder_updates_follow_edits_and_removals() {
        let dir = TempDir::new("folder");
        std::fs::write(dir.0.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.0.join("b.yaml"), POD).unwrap();
        std::fs::write(dir.0.join("notes.txt"), "not a manifest").unwrap();
        let mut store = ManifestStore::default();
        let sorted = |changes: &[Change]| {
            let mut names = kinds_and_names(changes);
            names.sort();
            names
        };
        assert!(store.update_from_folder(&dir.0).unwrap().is_empty());
        assert_eq!(store.parsed_last_update(), 2);
        assert_eq!(
            sorted(&store.take_changes()),
            ["upsert Pod p1", "upsert Service web"]
        );
        store.update_from_folder(&dir.0).unwrap();
        assert_eq!(store.parsed_last_update(), 0);
        assert!(store.take_changes().is_empty());
        // Same size, written at once after the read: still seen.
        std::fs::write(
            dir.0.join("b.yaml"),
            POD.replace("198.18.1.2", "198.18.1.3"),
        )
        .unwrap();
        std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
        store.update_from_folder(&dir.0).unwrap();
        assert_eq!(store.parsed_last_update(), 1);
        assert_eq!(
            sorted(&store.take_changes()),
            ["delete Service web", "upsert Pod p1"]
        );
        assert!(store.update_from_folder(&dir.0.join("missing")).is_err());
        // Only the paths a watcher reported: a new file, a broken one, one gone; the problems
        // of the whole folder are still reported.
        std::fs::write(dir.0.join("c.yaml"), SVC).unwrap();
        std::fs::write(dir.0.join("d.yaml"), "kind: [unclosed").unwrap();
        let problems = store.update_paths([dir.0.join("c.yaml"), dir.0.join("d.yaml")]);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            kinds_and_names(&store.take_changes()),
            ["upsert Service web"]
        );
        std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
        let problems = store.update_paths([dir.0.join("b.yaml"), dir.0.join("notes.txt")]);
        assert_eq!(problems.len(), 1, "d.yaml is still broken");
        assert_eq!(kinds_and_names(&store.take_changes()), ["delete Pod p1"]);
    }

    #[test]
    fn unsupported_kind_is_reported_not_fatal() {
        let deploy =
            format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n{SVC}");
        let objs = parse_file(Path::new("d.yaml"), &deploy).unwrap();
        assert!(objs[0].is_err());
        assert!(objs[1].is_ok());
    }

    #[test]
    fn adversarial_manifests_each_get_a_clear_error_and_change_nothing_else() {
        let cases: [(&str, &str); 12] = [
            ("kind: Service\nmetadata: {name: a}\n", "apiVersion"),
            ("apiVersion: v1\nmetadata: {name: a}\n", "kind"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: \"80\"}]}\n",
                "spec.ports[0].port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999999999999}]}\n",
                "spec.ports[0].port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: -1}]}\n",
                "spec.ports[0].port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 999.1.1.1, ports: [{port: 80}]}\n",
                "spec.clusterIP",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: {port: 80}}\n",
                "spec.ports",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: [a]}\nspec: {ports: [{port: 80}]}\n",
                "metadata.name",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: not-an-ip}\n",
                "status.podIP",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n",
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\nsubsets: [{addresses: [{ip: 1.2.3}], ports: [{port: 80}]}]\n",
                "subsets[0].addresses[0].ip",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.1.1]}]\nports: [{port: 65536}]\n",
                "ports[0].port",
            ),
        ];
        for (yaml, field) in cases {
            let mut store = Folder::default();
            assert!(
                store
                    .update(files(&[("good.yaml", SVC), ("bad.yaml", "")]))
                    .is_empty()
            );
            let errors = store.update(files(&[("good.yaml", SVC), ("bad.yaml", yaml)]));
            assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
            assert_eq!(errors[0].file, PathBuf::from("bad.yaml"), "{yaml}");
            assert!(
                errors[0]
                    .field
                    .as_deref()
                    .is_some_and(|f| f.starts_with(field)),
                "{yaml}: want field {field}, got {}",
                errors[0]
            );
            let names: Vec<String> = store.objects().map(|o| o.id().name.clone()).collect();
            assert_eq!(
                names,
                ["web"],
                "{yaml}: the good file's objects stay, nothing else appears"
            );
        }
    }

    #[test]
    fn huge_and_deep_documents_are_rejected_or_parsed_without_harm() {
        let many_ports: String = (1..=2000)
            .map(|p| format!("  - {{name: p{p}, port: {p}}}\n"))
            .collect();
        let big = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big}}\nspec:\n  ports:\n{many_ports}"
        );
        let objects = parse_file(Path::new("big.yaml"), &big).unwrap();
        assert!(matches!(&objects[0], Ok(Object::Service(s)) if s.ports.len() == 2000));
        let deep = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: d}}\nspec: {}{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(
            parse_file(Path::new("deep.yaml"), &deep).is_err(),
            "deep nesting is an error, not a crash"
        );
    }

    /// Mutates valid manifests at random for a bounded number of rounds: the loader never
    /// panics, every problem names its file, and the other file's objects always stay.
    #[test]
    fn fuzz_manifest_loader() {
        let rounds: usize = std::env::var("MANIFEST_FUZZ_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let seed: u64 = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(42);
        let corpus = [
            SVC.to_string(),
            POD.to_string(),
            format!("{SVC}---\n{POD}"),
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n- addresses: [{ip: 198.18.5.1}]\n  ports: [{name: http, port: 80}]\n".to_string(),
            "{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"name\":\"j\"},\"spec\":{\"ports\":[{\"port\":53,\"protocol\":\"UDP\"}]}}".to_string(),
        ];
        let tokens = [
            ":",
            "-",
            "[",
            "]",
            "{",
            "}",
            "\n",
            "  ",
            "\"",
            "0",
            "65536",
            "-1",
            "None",
            "null",
            "~",
            "&a",
            "*a",
            "!!binary",
            "1e400",
            "198.18.0.256",
            "---\n",
            "\t",
        ];
        let mut next = crate::test_random(seed);
        let other =
            "apiVersion: v1\nkind: Service\nmetadata: {name: keep}\nspec: {ports: [{port: 9}]}\n";
        let started = std::time::Instant::now();
        for round in 0..rounds {
            let base = &corpus[(next() % corpus.len() as u64) as usize];
            let mut text: Vec<u8> = base.clone().into_bytes();
            for _ in 0..1 + next() % 4 {
                let at = (next() % (text.len() as u64 + 1)) as usize;
                match next() % 3 {
                    0 if at < text.len() => {
                        text.remove(at);
                    }
                    1 if at < text.len() => text[at] = next() as u8,
                    _ => {
                        let token = tokens[(next() % tokens.len() as u64) as usize];
                        text.splice(at..at, token.bytes());
                    }
                }
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            let name = if base.starts_with('{') {
                "fuzz.json"
            } else {
                "fuzz.yaml"
            };
            let mut store = Folder::default();
            let errors = store.update(files(&[("keep.yaml", other), (name, &text)]));
            for e in &errors {
                assert_eq!(
                    e.file,
                    PathBuf::from(name),
                    "round {round} (FUZZ_SEED={seed}): {e}"
                );
                assert!(!e.message.is_empty());
            }
            assert!(
                store.objects().any(|o| o.id().name == "keep"),
                "round {round} (FUZZ_SEED={seed}): the other file's Service must stay; input:\n{text}"
            );
        }
        eprintln!("{rounds} mutated manifests in {:.1?}", started.elapsed());
    }
}
