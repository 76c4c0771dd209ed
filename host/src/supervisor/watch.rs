//! Watching files for hot reload: the directories of `plugins.toml` and of every plugin's
//! `.wasm`, and when a burst of changes has settled into finished files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// A watched file changed.
#[derive(Debug)]
pub(super) struct Change {
    path: PathBuf,
    /// The change finished the file: its writer closed it, or it was renamed into place.
    written: bool,
}

/// How long to wait after a change that finished its file, for the other events of the same
/// step (a rename reports the old and the new name, a copy several files).
const SETTLE: Duration = Duration::from_millis(5);

/// Collects the changes that belong to one reload, starting from `first`, and returns the
/// files touched. A build writes a file in several steps, so while any touched file's last
/// change left it unfinished (written to but not closed yet), this waits for `debounce` of
/// quiet; once every file was last closed or renamed into place, [`SETTLE`] is enough. That
/// makes a `cp` or an atomic rename take effect within milliseconds without risking a
/// reload of a half-written file.
pub(super) async fn settle(
    first: Change,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    debounce: Duration,
) -> Vec<PathBuf> {
    // Each touched file, and whether its last change left it unfinished.
    let mut unfinished = BTreeMap::from([(first.path, !first.written)]);
    loop {
        let wait = if unfinished.values().any(|&u| u) {
            debounce
        } else {
            SETTLE.min(debounce)
        };
        match tokio::time::timeout(wait, changes.recv()).await {
            Ok(Some(c)) => {
                unfinished.insert(c.path, !c.written);
            }
            _ => break,
        }
    }
    unfinished.into_keys().collect()
}

/// Watches the directories of the given files (a file that is replaced, as builds do, is a
/// new inode: watching the file itself would miss the next change) and reports changes to
/// exactly those files.
pub(super) struct FileWatcher {
    watcher: notify::RecommendedWatcher,
    files: Arc<std::sync::Mutex<BTreeSet<PathBuf>>>,
    dirs: BTreeSet<PathBuf>,
}

impl FileWatcher {
    pub(super) fn new(changes: mpsc::UnboundedSender<Change>) -> Option<FileWatcher> {
        let files: Arc<std::sync::Mutex<BTreeSet<PathBuf>>> = Arc::default();
        let wanted = files.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
            let Ok(event) = event else { return };
            let written = match event.kind {
                // The writer closed the file, or a finished file was renamed into place.
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => true,
                EventKind::Access(_) => return,
                _ => false,
            };
            let wanted = wanted.lock().expect("watch list");
            for path in event.paths {
                if wanted.contains(&path) {
                    let _ = changes.send(Change { path, written });
                }
            }
        });
        match watcher {
            Ok(watcher) => Some(FileWatcher {
                watcher,
                files,
                dirs: BTreeSet::new(),
            }),
            Err(e) => {
                warn!("cannot watch files ({e}): reload with SIGHUP instead");
                None
            }
        }
    }

    /// Makes the watch list exactly `files`.
    pub(super) fn watch(&mut self, files: &[PathBuf]) {
        use notify::Watcher;
        let absolute: BTreeSet<PathBuf> = files.iter().map(|f| absolute(f)).collect();
        let dirs: BTreeSet<PathBuf> = absolute
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(new, notify::RecursiveMode::NonRecursive) {
                warn!(dir = %new.display(), "cannot watch: {e}");
            }
        }
        self.dirs = dirs;
        *self.files.lock().expect("watch list") = absolute;
    }
}

/// `path` made absolute and free of `.`/`..`, with its directory's symlinks resolved, so
/// it compares equal to the paths the watcher reports.
fn absolute(path: &Path) -> PathBuf {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return path.to_path_buf();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match std::fs::canonicalize(dir) {
        Ok(d) => d.join(name),
        Err(_) => std::env::current_dir()
            .map(|c| c.join(path))
            .unwrap_or_else(|_| path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn change(path: &str, written: bool) -> Change {
        Change {
            path: PathBuf::from(path),
            written,
        }
    }

    #[tokio::test]
    async fn a_finished_file_is_reloaded_without_waiting_out_the_debounce() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(change("a.wasm", true)).unwrap();
        let started = Instant::now();
        let touched = settle(change("a.wasm", false), &mut rx, Duration::from_secs(10)).await;
        assert_eq!(touched, vec![PathBuf::from("a.wasm")]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_file_still_being_written_waits_for_the_debounce() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // plugins.toml is finished, the .wasm is not: wait for the .wasm.
        tx.send(change("plugins.toml", true)).unwrap();
        let started = Instant::now();
        let touched = settle(change("a.wasm", false), &mut rx, Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            touched,
            vec![PathBuf::from("a.wasm"), PathBuf::from("plugins.toml")]
        );
    }

    /// What the file watcher reports for the two ways users replace a plugin: a copy (the
    /// writer closes the file) and an atomic rename.
    #[tokio::test]
    async fn the_watcher_reports_copies_and_renames_as_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher = FileWatcher::new(tx).expect("inotify");
        let target = dir.path().join("plugin.wasm");
        watcher.watch(std::slice::from_ref(&target));
        let finished = |rx: &mut mpsc::UnboundedReceiver<Change>| {
            let mut seen = Vec::new();
            while let Ok(c) = rx.try_recv() {
                assert_eq!(c.path, absolute(&target));
                seen.push(c.written);
            }
            seen
        };

        // Waits (not a fixed sleep: notify's thread may be slow to run) for a finished
        // write, then takes whatever else came soon after: the last must say finished.
        let until_finished = async |rx: &mut mpsc::UnboundedReceiver<Change>| {
            loop {
                let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("a finished write reported within 10 s")
                    .expect("the watcher runs");
                assert_eq!(c.path, absolute(&target));
                if c.written {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            finished(rx).last().copied().unwrap_or(true)
        };

        std::fs::write(&target, b"copied").unwrap();
        assert!(until_finished(&mut rx).await, "copy");

        let tmp = dir.path().join("plugin.tmp");
        std::fs::write(&tmp, b"renamed").unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        assert!(until_finished(&mut rx).await, "rename");

        // Other files in the directory are not reported.
        std::fs::write(dir.path().join("other.wasm"), b"x").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(finished(&mut rx).is_empty());
    }
}
