//! A local S3-compatible server for tests and benchmarks: moto's, run from a Python that has
//! `moto[server]` (and boto3, which it brings). It honours conditional puts
//! (`If-None-Match: *`), which prefcap's markers rely on.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// moto's S3 server on a free port of 127.0.0.1, killed on drop.
pub struct MotoServer {
    child: Child,
    python: PathBuf,
    endpoint: String,
}

impl MotoServer {
    /// Starts the server with `python` and waits (up to a minute) until it accepts
    /// connections. `min_part_bytes` lowers S3's 5 MiB minimum part size, so small shards can
    /// exercise multipart uploads.
    pub fn start(python: &Path, min_part_bytes: Option<usize>) -> io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new(python);
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(bytes) = min_part_bytes {
            cmd.env("S3_UPLOAD_PART_MIN_SIZE", bytes.to_string());
        }
        let mut server = Self {
            child: cmd.spawn()?,
            python: python.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || server.child.try_wait()?.is_some() {
                return Err(io::Error::other("moto's S3 server did not start"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates `bucket` (with boto3, any credentials: moto checks none).
    pub fn create_bucket(&self, bucket: &str) -> io::Result<()> {
        let status = Command::new(&self.python)
            .args([
                "-c",
                &format!(
                    "import boto3; boto3.client('s3', endpoint_url='{}', \
                     aws_access_key_id='test', aws_secret_access_key='test', \
                     region_name='us-east-1').create_bucket(Bucket='{bucket}')",
                    self.endpoint
                ),
            ])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("cannot create bucket {bucket}")))
        }
    }

    /// The environment a `pipeline` process needs to use this server as its S3.
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
