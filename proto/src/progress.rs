//! A long operation's progress as a gRPC server stream (backups, restores): units
//! done of total, sent at most every 200 ms, then the report or the error.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::Status;

use crate::control::BackupProgress;

/// The stream a service answers with.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<BackupProgress, Status>> + Send>>;

/// The sending end, used from a plain thread.
pub struct ProgressSender {
    tx: tokio::sync::mpsc::Sender<Result<BackupProgress, Status>>,
    last: Mutex<Option<Instant>>,
}

/// A sender and the stream it feeds.
pub fn channel() -> (ProgressSender, ProgressStream) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (
        ProgressSender {
            tx,
            last: Mutex::new(None),
        },
        Box::pin(ReceiverStream::new(rx)),
    )
}

impl ProgressSender {
    /// Reports `done` of `total` (dropped if the last report is under 200 ms old
    /// and this is not the end, or if the reader is slow).
    pub fn progress(&self, done: u64, total: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) || done == total;
        if due {
            *last = Some(Instant::now());
            let _ = self.tx.try_send(Ok(BackupProgress {
                done,
                total,
                report_json: String::new(),
            }));
        }
    }

    /// Ends the stream with the report (as JSON) or the error.
    pub fn finish(self, result: Result<String, Status>) {
        let _ = self.tx.blocking_send(result.map(|report_json| BackupProgress {
            done: 0,
            total: 0,
            report_json,
        }));
    }

    /// Whether the reader has gone (the caller hung up).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
