//! Where backups are kept: a target's objects, by key.
//!
//! A target is named by a URL: `file:///PATH` (a local disk, or a mounted NFS or CIFS
//! share) or `s3://BUCKET[/PREFIX]` (any S3-compatible service). Whatever the
//! target, an object is written whole or not at all, and keys are checked before
//! they touch a path or a request: `[A-Za-z0-9._-]` components joined by `/`, none
//! empty or starting with a dot.

use std::path::{Path, PathBuf};

/// What went wrong with a target.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A key or URL that is not one.
    #[error("{0}")]
    Invalid(String),
    /// The target failed an operation.
    #[error("{target}: cannot {op} {key}: {source}")]
    Io {
        /// The target, as its URL.
        target: String,
        /// What was being done.
        op: &'static str,
        /// The object's key.
        key: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A service (S3) refused an operation or did not answer.
    #[error("{target}: cannot {op} {key}: {reason}")]
    Service {
        /// The target, as its URL.
        target: String,
        /// What was being done.
        op: &'static str,
        /// The object's key.
        key: String,
        /// Why, as the service said it.
        reason: String,
    },
}

/// The target at `url`, opened: a directory for `file://`, a bucket for `s3://`
/// reached with `s3` (its empty fields filled from the environment).
pub fn open_target(url: &str, s3: &crate::s3::S3Settings) -> Result<Box<dyn ObjectStore>, StoreError> {
    match url.parse::<TargetUrl>()? {
        TargetUrl::File(root) => Ok(Box::new(FileStore::open(&root)?)),
        #[cfg(feature = "s3")]
        TargetUrl::S3 { bucket, prefix } => Ok(Box::new(crate::s3::S3Store::open(
            &bucket,
            &prefix,
            &s3.clone().with_env(),
        )?)),
        #[cfg(not(feature = "s3"))]
        TargetUrl::S3 { .. } => {
            let _ = s3;
            Err(StoreError::Invalid(format!(
                "{url}: this build of Horn has no S3 client (horn-backup's feature s3)"
            )))
        }
    }
}

/// A target's objects.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// The target's URL, for messages.
    fn url(&self) -> String;
    /// Writes `data` as `key`, replacing it, whole or not at all.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError>;
    /// The object `key`, if there is one.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether `key` exists.
    fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Every key starting with `prefix` (which ends with `/`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// The names one level below `prefix` (which ends with `/`) that have keys under
    /// them, sorted: `volumes/` gives the volumes, without listing their backups.
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Removes `key`; nothing happens if it is absent.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// A target's URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// `file:///PATH`: a directory (a mounted share, a local disk).
    File(PathBuf),
    /// `s3://BUCKET[/PREFIX]`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix within it (empty, or ending with `/`).
        prefix: String,
    },
}

impl std::str::FromStr for TargetUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<TargetUrl, StoreError> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(StoreError::Invalid(format!(
                    "{url}: a file target needs an absolute path (file:///mnt/backups)"
                )));
            }
            return Ok(TargetUrl::File(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'));
            if !bucket_ok {
                return Err(StoreError::Invalid(format!(
                    "{url}: {bucket:?} is not an S3 bucket name (3-63 of a-z 0-9 . -)"
                )));
            }
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty() {
                check_key(prefix)?;
            }
            return Ok(TargetUrl::S3 {
                bucket: bucket.to_string(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
            });
        }
        Err(StoreError::Invalid(format!(
            "{url:?} is not a backup target: give file:///PATH or s3://BUCKET[/PREFIX]"
        )))
    }
}

/// Refuses a key that is not `/`-joined components of `[A-Za-z0-9._-]`, each
/// non-empty and not starting with a dot (no `..`, no absolute path, no hidden file).
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{key:?} is not an object key")))
    }
}

/// A target in a directory: each object a file under it, written to a temporary
/// file first, synced, and renamed into place (its directory synced too).
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// The target in `root`, which must exist and be a directory (a share not
    /// mounted is refused rather than filled on the local disk beneath).
    pub fn open(root: &Path) -> Result<FileStore, StoreError> {
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => Ok(FileStore {
                root: root.to_path_buf(),
            }),
            Ok(_) => Err(StoreError::Invalid(format!(
                "file://{}: not a directory",
                root.display()
            ))),
            Err(e) => Err(StoreError::Invalid(format!(
                "file://{}: {e} (create it, or mount the share there, first)",
                root.display()
            ))),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key.trim_end_matches('/'))?;
        Ok(self.root.join(key))
    }

    fn io(&self, op: &'static str, key: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        let key = key.to_string();
        move |source| StoreError::Io {
            target: self.url(),
            op,
            key,
            source,
        }
    }
}

/// Syncs directory `dir` (a rename in it is then durable).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl ObjectStore for FileStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        use std::io::Write;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent: the root");
        std::fs::create_dir_all(dir).map_err(self.io("create the directory of", key))?;
        // A hidden name: never listed, and not a key a caller can give.
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(dir)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(self.io("write", key))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(self.path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("read", key)(e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match std::fs::metadata(self.path(key)?) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("look up", key)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !prefix.ends_with('/') {
            return Err(StoreError::Invalid(format!(
                "a listing's prefix {prefix:?} must end with /"
            )));
        }
        let mut out = Vec::new();
        let mut dirs = vec![(self.path(prefix)?, prefix.to_string())];
        while let Some((dir, key)) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", &key)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(self.io("list", &key))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let kind = entry.file_type().map_err(self.io("list", &key))?;
                if kind.is_dir() {
                    dirs.push((entry.path(), format!("{key}{name}/")));
                } else if kind.is_file() {
                    out.push(format!("{key}{name}"));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !prefix.ends_with('/') {
            return Err(StoreError::Invalid(format!(
                "a listing's prefix {prefix:?} must end with /"
            )));
        }
        let dir = self.path(prefix)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("list", prefix)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io("list", prefix))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && entry.file_type().map_err(self.io("list", prefix))?.is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            "file:///mnt/b".parse::<TargetUrl>().unwrap(),
            TargetUrl::File("/mnt/b".into())
        );
        assert_eq!(
            "s3://horn-backups/site-a/".parse::<TargetUrl>().unwrap(),
            TargetUrl::S3 {
                bucket: "horn-backups".into(),
                prefix: "site-a/".into()
            }
        );
        assert_eq!(
            "s3://bkt".parse::<TargetUrl>().unwrap(),
            TargetUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        for (bad, why) in [
            ("file://relative", "absolute path"),
            ("s3://B", "bucket name"),
            ("s3://bkt/../x", "object key"),
            ("nfs://x", "file:///PATH or s3://"),
        ] {
            let e = bad.parse::<TargetUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_file_target_writes_whole_objects_lists_by_prefix_and_refuses_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileStore::open(&dir.path().join("not-mounted")).is_err());
        let s = FileStore::open(dir.path()).unwrap();
        s.put("volumes/v1/backups/b1.json", b"one").unwrap();
        s.put("volumes/v1/backups/b2.json", b"two").unwrap();
        s.put("volumes/v2/backups/b1.json", b"other").unwrap();
        s.put("blocks/ab/abcd", b"block").unwrap();
        s.put("volumes/v1/backups/b1.json", b"one again").unwrap();
        assert_eq!(
            s.get("volumes/v1/backups/b1.json").unwrap().unwrap(),
            b"one again"
        );
        assert_eq!(s.get("volumes/v1/backups/b9.json").unwrap(), None);
        assert!(s.exists("blocks/ab/abcd").unwrap());
        assert!(!s.exists("blocks/ab/ffff").unwrap());
        assert_eq!(
            s.list("volumes/v1/backups/").unwrap(),
            ["volumes/v1/backups/b1.json", "volumes/v1/backups/b2.json"]
        );
        assert_eq!(s.list("blocks/").unwrap(), ["blocks/ab/abcd"]);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("blocks/ab/abcd").unwrap();
        s.delete("blocks/ab/abcd").unwrap();
        assert!(s.list("blocks/").unwrap().is_empty());
        // No temporary file is left behind, and none would be listed.
        let leftovers = std::fs::read_dir(dir.path().join("volumes/v1/backups"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(leftovers, 0);
        for bad in ["../x", "/etc/passwd", "a//b", "a/.hidden", "", "a b"] {
            assert!(s.put(bad, b"x").is_err(), "{bad}");
            assert!(s.get(bad).is_err(), "{bad}");
        }
        assert!(s.list("volumes").is_err());
    }
}
