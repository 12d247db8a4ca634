//! The S3 target: any S3-compatible service (AWS, Garage, MinIO, Ceph RGW...).
//!
//! The SDK is async; a target is used from plain threads (a backup's readers and
//! uploaders, a restore's fetchers), so the store keeps a small runtime of its own
//! and blocks on each request. Keys are prefixed with the URL's prefix. Checksums are
//! not asked of the service: every block and manifest is checked by its own content
//! when read (docs/backup-format.md).

#[cfg(feature = "s3")]
pub use client::S3Store;

#[cfg(feature = "s3")]
mod client {
    use std::time::Duration;

    use aws_sdk_s3::config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    };
    use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::Client;
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    use aws_smithy_types::retry::RetryConfig;
    use aws_smithy_types::timeout::TimeoutConfig;

    use super::S3Settings;
    use crate::store::{check_key, ObjectStore, StoreError};

    /// A bucket (and prefix within it) of an S3 service.
    pub struct S3Store {
        /// Dropped without waiting (a store may be dropped on an async thread).
        runtime: Option<tokio::runtime::Runtime>,
        client: Client,
        bucket: String,
        prefix: String,
        endpoint: String,
    }

    impl std::fmt::Debug for S3Store {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "S3Store({})", self.url())
        }
    }

    impl Drop for S3Store {
        fn drop(&mut self) {
            if let Some(rt) = self.runtime.take() {
                rt.shutdown_background();
            }
        }
    }

    impl S3Store {
        /// The target `s3://BUCKET/PREFIX` reached with `settings`. Checks that the bucket
        /// exists and the credentials may use it, so a wrong key, a missing bucket or an
        /// endpoint that does not answer is told at once, by name.
        pub fn open(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<S3Store, StoreError> {
            let url = format!("s3://{bucket}/{prefix}");
            if settings.access_key.is_empty() || settings.secret_key.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{url}: no S3 credentials: give an access key and secret (--s3-credentials-file, \
                 or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                )));
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("horn-s3")
                .enable_all()
                .build()
                .map_err(|e| {
                    StoreError::Invalid(format!("{url}: cannot start the S3 client's runtime: {e}"))
                })?;
            let region = if settings.region.is_empty() {
                "us-east-1".to_string()
            } else {
                settings.region.clone()
            };
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
                .build_https();
            let mut config = aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .http_client(http)
                .region(Region::new(region))
                .credentials_provider(Credentials::new(
                    settings.access_key.clone(),
                    settings.secret_key.clone(),
                    None,
                    None,
                    "horn",
                ))
                .retry_config(RetryConfig::standard().with_max_attempts(4))
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_attempt_timeout(Duration::from_secs(120))
                        .build(),
                )
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            if !settings.endpoint.is_empty() {
                // Services other than AWS's name buckets in the path, not the host.
                config = config
                    .endpoint_url(settings.endpoint.clone())
                    .force_path_style(true);
            }
            let store = S3Store {
                client: Client::from_conf(config.build()),
                runtime: Some(runtime),
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                endpoint: if settings.endpoint.is_empty() {
                    "AWS".to_string()
                } else {
                    settings.endpoint.clone()
                },
            };
            store.check_bucket()?;
            Ok(store)
        }

        fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
            self.runtime
                .as_ref()
                .expect("the runtime lives as long as the store")
                .block_on(f)
        }

        fn full_key(&self, key: &str) -> Result<String, StoreError> {
            check_key(key.trim_end_matches('/'))?;
            Ok(format!("{}{key}", self.prefix))
        }

        /// An SDK error as a store error: the service's code and message where it gave
        /// them, or why the request never got an answer.
        fn failed<E: ProvideErrorMetadata + std::error::Error + 'static>(
            &self,
            op: &'static str,
            key: &str,
            e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        ) -> StoreError {
            let reason = match &e {
                SdkError::ServiceError(s) => {
                    let err = s.err();
                    match (err.code(), err.message()) {
                    (Some("InvalidAccessKeyId"), _) => {
                        "the service does not know this access key (InvalidAccessKeyId)".to_string()
                    }
                    (Some("SignatureDoesNotMatch"), _) => {
                        "the secret key is wrong for this access key (SignatureDoesNotMatch)".to_string()
                    }
                    (Some("NoSuchBucket"), _) => format!("there is no bucket {:?} (NoSuchBucket)", self.bucket),
                    (Some("AccessDenied"), m) => format!(
                        "access denied: the credentials are wrong or may not use this bucket (AccessDenied: {})",
                        m.unwrap_or("no reason given")
                    ),
                    (Some(code), Some(m)) => format!("{code}: {m}"),
                    (Some(code), None) => code.to_string(),
                    _ => format!("HTTP {}", s.raw().status().as_u16()),
                }
                }
                SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                    // The innermost cause says it best ("Connection refused").
                    let mut cause: &dyn std::error::Error = &e;
                    while let Some(next) = cause.source() {
                        cause = next;
                    }
                    format!("the service at {} does not answer: {cause}", self.endpoint)
                }
                _ => DisplayErrorContext(&e).to_string(),
            };
            StoreError::Service {
                target: self.url(),
                op,
                key: key.to_string(),
                reason,
            }
        }

        /// Every page of a listing under `prefix` (grouped at `delimiter` if given),
        /// handed to `f` with the full prefix listed.
        fn each_page(
            &self,
            prefix: &str,
            delimiter: Option<&str>,
            mut f: impl FnMut(&aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output, &str),
        ) -> Result<(), StoreError> {
            let full = self.full_key(prefix)?;
            let mut token = None;
            loop {
                let page = self
                    .block_on(
                        self.client
                            .list_objects_v2()
                            .bucket(&self.bucket)
                            .prefix(&full)
                            .set_delimiter(delimiter.map(str::to_string))
                            .set_continuation_token(token.take())
                            .send(),
                    )
                    .map_err(|e| self.failed("list", prefix, e))?;
                f(&page, &full);
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => return Ok(()),
                }
            }
        }

        /// One listing of at most one key: an answer with a body, so a refusal says why.
        fn check_bucket(&self) -> Result<(), StoreError> {
            self.block_on(
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&self.prefix)
                    .max_keys(1)
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| self.failed("reach", "the bucket", e))
        }
    }

    impl ObjectStore for S3Store {
        fn url(&self) -> String {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }

        fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
            let full = self.full_key(key)?;
            self.block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .body(ByteStream::from(data.to_vec()))
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| self.failed("write", key, e))
        }

        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let full = self.full_key(key)?;
            self.block_on(async {
                match self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .send()
                    .await
                {
                    Ok(out) => {
                        out.body
                            .collect()
                            .await
                            // Moved out where it came in one piece; copied once otherwise.
                            .map(|b| Some(Vec::from(b.into_bytes())))
                            .map_err(|e| StoreError::Service {
                                target: self.url(),
                                op: "read",
                                key: key.to_string(),
                                reason: e.to_string(),
                            })
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(self.failed("read", key, e)),
                }
            })
        }

        fn exists(&self, key: &str) -> Result<bool, StoreError> {
            let full = self.full_key(key)?;
            match self.block_on(self.client.head_object().bucket(&self.bucket).key(full).send()) {
                Ok(_) => Ok(true),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
                Err(e) => Err(self.failed("look for", key, e)),
            }
        }

        fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            let mut keys = Vec::new();
            self.each_page(prefix, None, |page, _| {
                for o in page.contents() {
                    if let Some(k) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        keys.push(k.to_string());
                    }
                }
            })?;
            keys.sort();
            Ok(keys)
        }

        fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            let mut names = Vec::new();
            self.each_page(prefix, Some("/"), |page, full| {
                for p in page.common_prefixes() {
                    if let Some(name) = p.prefix().and_then(|k| k.strip_prefix(full)) {
                        names.push(name.trim_end_matches('/').to_string());
                    }
                }
            })?;
            names.sort();
            Ok(names)
        }

        fn delete(&self, key: &str) -> Result<(), StoreError> {
            let full = self.full_key(key)?;
            self.block_on(self.client.delete_object().bucket(&self.bucket).key(full).send())
                .map(|_| ())
                .map_err(|e| self.failed("delete", key, e))
        }
    }
}

/// Where and as whom an S3 target is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// The service's endpoint (`http://127.0.0.1:3900`); empty: AWS's own.
    pub endpoint: String,
    /// The region (`us-east-1` for AWS's default; Garage's is `garage`).
    pub region: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key.
    pub secret_key: String,
}

impl S3Settings {
    /// Settings from the environment, as the AWS tools read them:
    /// `AWS_ENDPOINT_URL`, `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`; each only where `self` leaves it empty.
    pub fn with_env(mut self) -> S3Settings {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let fill = |field: &mut String, keys: &[&str]| {
            if field.is_empty() {
                if let Some(v) = keys.iter().find_map(|k| env(k)) {
                    *field = v;
                }
            }
        };
        fill(&mut self.endpoint, &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]);
        fill(&mut self.region, &["AWS_REGION", "AWS_DEFAULT_REGION"]);
        fill(&mut self.access_key, &["AWS_ACCESS_KEY_ID"]);
        fill(&mut self.secret_key, &["AWS_SECRET_ACCESS_KEY"]);
        self
    }
}
