//! Where the tables live: a local directory, or a prefix of an S3 bucket
//! (`s3://bucket/prefix`, any S3-API server). Consumes `parquet.data_dir`;
//! produces the location of each table and, for S3, the client: built by
//! object_store from the environment only (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`, …), never from the configuration file. Guarantee: an
//! upload is one PUT (or a multipart upload completed in one request), so a
//! reader sees a whole object or none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data_dir {0:?}: {1}")]
    Location(String, String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bucket prefix on an S3-API server.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `s3://bucket/prefix/` (with the trailing slash).
    pub url: Url,
    /// The bucket's client ("/" is the bucket's root).
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside the bucket (empty for the bucket's root).
    pub prefix: String,
}

/// The root of the tables.
#[derive(Debug, Clone)]
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

/// Whether a `data_dir` names object storage.
pub fn is_remote(data_dir: &Path) -> bool {
    data_dir.to_str().is_some_and(|s| s.starts_with("s3://"))
}

impl Location {
    /// Parses `data_dir`: `s3://bucket[/prefix]` or a local path.
    pub fn parse(data_dir: &Path) -> Result<Location, StorageError> {
        let Some(s) = data_dir.to_str().filter(|s| s.starts_with("s3://")) else {
            return Ok(Location::Local(data_dir.to_path_buf()));
        };
        let bad = |why: &str| StorageError::Location(s.to_string(), why.to_string());
        let url = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket"))?
            .to_string();
        let prefix = url.path().trim_matches('/').to_string();
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .build()?;
        let root = if prefix.is_empty() {
            format!("s3://{bucket}/")
        } else {
            format!("s3://{bucket}/{prefix}/")
        };
        Ok(Location::Remote(Remote {
            url: Url::parse(&root).map_err(|e| bad(&e.to_string()))?,
            store: Arc::new(store),
            prefix,
        }))
    }

    /// The location of table `name`.
    pub fn table(&self, name: &str) -> TableLocation {
        match self {
            Location::Local(d) => TableLocation::Local(d.join(name)),
            Location::Remote(r) => TableLocation::Remote(r.child(name)),
        }
    }
}

impl Remote {
    /// The same bucket, one level deeper.
    pub fn child(&self, name: &str) -> Remote {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        };
        Remote {
            url: self
                .url
                .join(&format!("{name}/"))
                .unwrap_or_else(|_| self.url.clone()),
            store: self.store.clone(),
            prefix,
        }
    }

    /// The object key of `rel` (a path relative to this prefix).
    pub fn key(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Uploads a local file to `rel` (multipart past a few MB).
    pub async fn upload(&self, local: &Path, rel: &str) -> Result<(), StorageError> {
        let io = |source| StorageError::Io {
            path: local.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(io)?;
        let mut w = object_store::buffered::BufWriter::new(self.store.clone(), self.key(rel));
        if let Err(e) = tokio::io::copy(&mut file, &mut w).await {
            let _ = w.abort().await;
            return Err(io(e));
        }
        w.shutdown().await.map_err(io)?;
        Ok(())
    }

    /// The size of the object at `rel`, if there is one.
    pub async fn size_of(&self, rel: &str) -> Result<Option<u64>, StorageError> {
        match self.store.head(&self.key(rel)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole object at `rel`.
    pub async fn get(&self, rel: &str) -> Result<bytes::Bytes, StorageError> {
        Ok(self.store.get(&self.key(rel)).await?.bytes().await?)
    }
}

/// Where a table lives.
#[derive(Debug, Clone)]
pub enum TableLocation {
    Local(PathBuf),
    Remote(Remote),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dirs_parse_into_local_paths_and_bucket_prefixes() {
        assert!(matches!(
            Location::parse(Path::new("pulse-data")).unwrap(),
            Location::Local(p) if p == Path::new("pulse-data")
        ));
        let Location::Remote(r) = Location::parse(Path::new("s3://bkt/a/b/")).unwrap() else {
            panic!("an s3 URL is remote");
        };
        assert_eq!(r.url.as_str(), "s3://bkt/a/b/");
        assert_eq!(r.prefix, "a/b");
        let t = r.child("events");
        assert_eq!(t.url.as_str(), "s3://bkt/a/b/events/");
        assert_eq!(
            t.key("dt=x/f.parquet").as_ref(),
            "a/b/events/dt=x/f.parquet"
        );
        let Location::Remote(root) = Location::parse(Path::new("s3://bkt")).unwrap() else {
            panic!("remote");
        };
        assert_eq!(root.child("events").key("f").as_ref(), "events/f");
        assert!(Location::parse(Path::new("s3:///x")).is_err());
        assert!(is_remote(Path::new("s3://bkt/p")) && !is_remote(Path::new("/tmp/s3")));
    }
}
