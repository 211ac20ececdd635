//! A frame-level HTTP/2 load client that moves to a new connection on GOAWAY and classifies every stream
//! it opened as completed, refused (never processed, safe to resend) or broken (lost).
//!
//! Self-contained (tokio, bytes, serde and the frame codec beside it only): `examples/h2churn.rs`
//! includes both with `#[path]`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::h2frame::{
    get_block, parse, put_frame, Frame, ACK, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, GOAWAY,
    HEADERS, MAX_STREAM_ID, PADDED, PING, PREFACE, PRIORITY, REFUSED_STREAM, RST_STREAM, SETTINGS,
    SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, WINDOW_UPDATE,
};

/// How long a connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the duration, how long open streams get to finish before they count as broken.
const GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed connect, or a connection that completed nothing, so a closed listener or a
/// server refusing everything is not hammered in a tight loop.
const BACKOFF: Duration = Duration::from_millis(20);
/// After closing, how long the server's last frames are read and discarded: closing with unread bytes
/// would make our kernel answer with a RST, which is not what a client that is done does.
const LINGER: Duration = Duration::from_millis(500);
/// Samples kept in a report, each kind.
const MAX_SAMPLES: usize = 20;
/// Connection-level events kept per connection for a sample.
const MAX_EVENTS: usize = 12;
/// Receive windows as Go's HTTP/2 client sets them: large, so a server may have much more in flight than
/// the 64 KiB default allows (and a reset connection can lose it).
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 1 << 30;

/// HPACK static table entry 8, `:status 200`, fully indexed: the only encoding of a 200 we accept.
const STATUS_200: u8 = 0x88;

/// What to run: `conns` connections at a time, each keeping `streams` GETs in flight, for `duration`.
#[derive(Clone, Debug)]
pub struct ChurnOptions {
    /// The server (h2c with prior knowledge).
    pub addr: SocketAddr,
    /// `:authority` of every request.
    pub authority: String,
    /// `:path` of every request (GET, no body).
    pub path: String,
    /// Connections at a time, one worker each.
    pub conns: usize,
    /// Streams each connection keeps in flight until it receives a GOAWAY.
    pub streams: usize,
    /// How long new streams are opened; open ones then get up to 10 s more.
    pub duration: Duration,
}

/// Totals while the run goes on (streams are counted completed as they complete).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Streams completed so far.
    pub completed: u64,
    /// Connections established so far.
    pub connections: u64,
    /// Connections that have received a GOAWAY so far.
    pub goaways: u64,
}

/// What the client saw, every opened stream counted exactly once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnReport {
    /// `:status 200` and END_STREAM received.
    pub completed: u64,
    /// Of those, the ones on a connection opened after its worker's previous one received a GOAWAY:
    /// the client moved and was served on the new connection.
    pub completed_after_goaway: u64,
    /// Never processed: above the final GOAWAY's last stream id, or reset with REFUSED_STREAM.
    pub refused: u64,
    /// Accepted and not completed: reset otherwise, non-200, or the connection ended under it.
    pub broken: u64,
    /// Connections established.
    pub connections: u64,
    /// Connections that received at least one GOAWAY.
    pub goaways: u64,
    /// Connects refused or timed out (nothing was sent on them).
    pub connect_errors: u64,
    /// One line per connection that broke streams: its frame history and what each broken stream saw.
    pub broken_samples: Vec<String>,
    /// Things a correct server never does (a response on a stream above the last stream id).
    pub anomalies: Vec<String>,
}

/// A run in progress.
pub struct Churn {
    /// Live totals, e.g. to act once some streams have completed.
    pub progress: watch::Receiver<Progress>,
    task: JoinHandle<ChurnReport>,
}

impl Churn {
    /// Starts the workers at once; they stop opening streams when `duration` is over.
    pub fn start(opts: ChurnOptions) -> Self {
        let (tx, progress) = watch::channel(Progress::default());
        let stop_at = Instant::now() + opts.duration;
        let shared =
            Arc::new(Shared { opts, stop_at, give_up_at: stop_at + GRACE, report: Mutex::default(), progress: tx });
        let task = tokio::spawn(async move {
            let workers: Vec<_> = (0..shared.opts.conns).map(|_| tokio::spawn(worker(shared.clone()))).collect();
            for w in workers {
                // A panicking worker would leave its streams uncounted: better no report than a wrong one.
                w.await.expect("a churn worker panicked");
            }
            let report = shared.report.lock().unwrap().clone();
            report
        });
        Self { progress, task }
    }

    /// Waits for every worker (at most the duration plus a 10 s grace) and returns the report.
    pub async fn finish(self) -> ChurnReport {
        self.task.await.expect("churn workers do not panic")
    }
}

struct Shared {
    opts: ChurnOptions,
    stop_at: Instant,
    give_up_at: Instant,
    report: Mutex<ChurnReport>,
    progress: watch::Sender<Progress>,
}

/// One worker: a connection at a time, a fresh one whenever the last ended, until the duration is over.
async fn worker(shared: Arc<Shared>) {
    // The worker's last connection received a GOAWAY: the next one is where it moved.
    let mut moved = false;
    while Instant::now() < shared.stop_at {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.opts.addr)).await;
        let Ok(Ok(stream)) = connect else {
            shared.report.lock().unwrap().connect_errors += 1;
            tokio::time::sleep_until(shared.stop_at.min(Instant::now() + BACKOFF)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = {
            let mut r = shared.report.lock().unwrap();
            r.connections += 1;
            r.connections
        };
        shared.progress.send_modify(|p| p.connections += 1);
        let (completed, goaway) = Conn::new(id, shared.clone(), moved).run(stream).await;
        moved = goaway;
        if completed == 0 {
            tokio::time::sleep_until(shared.stop_at.min(Instant::now() + BACKOFF)).await;
        }
    }
}

/// The first `:status` of a stream, from the first byte of its first header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    None,
    /// The first HEADERS had an empty fragment: the first byte is in a CONTINUATION.
    Pending,
    Ok,
    Other(Option<u8>),
}

#[derive(Debug)]
struct Stream {
    status: Status,
    end_stream: bool,
    reset: Option<u32>,
    data_frames: u32,
    data_bytes: u64,
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// Every stream we waited for finished; we closed.
    Done,
    Eof,
    EofMidFrame,
    ReadError(std::io::ErrorKind),
    /// Still waiting when the grace after the duration ran out.
    GaveUp,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => f.write_str("closed by client"),
            Self::Eof => f.write_str("EOF"),
            Self::EofMidFrame => f.write_str("EOF mid-frame"),
            Self::ReadError(kind) => write!(f, "read error ({kind})"),
            Self::GaveUp => f.write_str("no answer within the grace period"),
        }
    }
}

struct Conn {
    id: u64,
    shared: Arc<Shared>,
    /// Opened after the worker's previous connection received a GOAWAY.
    moved: bool,
    started: Instant,
    next_id: u32,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, once known.
    server_max: Option<u32>,
    /// Streams opened and not finished, by id.
    active: BTreeMap<u32, Stream>,
    /// Streams finished without completing (reset, non-200), kept for classification.
    ended: Vec<(u32, Stream)>,
    /// Completed streams; only their ids matter (a completed id above the last stream id is an anomaly).
    completed: Vec<u32>,
    /// The last GOAWAY's last stream id: the final word on what the server processed.
    last_stream_id: Option<u32>,
    /// A header block being continued: its stream, and whether its HEADERS carried END_STREAM.
    continuation: Option<(u32, bool)>,
    events: Vec<String>,
    out: BytesMut,
}

impl Conn {
    fn new(id: u64, shared: Arc<Shared>, moved: bool) -> Self {
        Self {
            id,
            shared,
            moved,
            started: Instant::now(),
            next_id: 1,
            server_max: None,
            active: BTreeMap::new(),
            ended: Vec::new(),
            completed: Vec::new(),
            last_stream_id: None,
            continuation: None,
            events: Vec::new(),
            out: BytesMut::new(),
        }
    }

    /// Runs the connection to its end, records its streams, and returns how many completed and
    /// whether it received a GOAWAY.
    async fn run(mut self, stream: TcpStream) -> (u64, bool) {
        let (mut rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(wr, rx, self.shared.give_up_at + LINGER));
        self.out.put_slice(PREFACE);
        let mut settings = Vec::new();
        for (id, value) in [(SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        self.frame(SETTINGS, 0, 0, &settings);
        if CONN_WINDOW > DEFAULT_WINDOW {
            // A zero increment would be a protocol error.
            self.frame(WINDOW_UPDATE, 0, 0, &(CONN_WINDOW - DEFAULT_WINDOW).to_be_bytes());
        }
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let end = loop {
            while let Some(Frame { kind, flags, stream, payload }) = parse(&mut buf) {
                self.on_frame(kind, flags, stream, payload);
            }
            self.open_streams();
            if !self.out.is_empty() {
                // A writer gone after a write error is not an outcome: the read side tells how it ended.
                let _ = tx.send(self.out.split().freeze());
            }
            if self.waiting_for().is_none() {
                break End::Done;
            }
            match tokio::time::timeout_at(self.shared.give_up_at, rd.read_buf(&mut buf)).await {
                Err(_) => break End::GaveUp,
                Ok(Ok(0)) if buf.is_empty() => break End::Eof,
                Ok(Ok(0)) => break End::EofMidFrame,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break End::ReadError(e.kind()),
            }
        };
        if matches!(end, End::Done) {
            // Like a client that is done with the connection: GOAWAY, then FIN (the writer does it when
            // the channel closes), reading what the server still sends until it closes too.
            let mut goaway = [0u8; 8];
            goaway[..4].copy_from_slice(&0u32.to_be_bytes());
            self.frame(GOAWAY, 0, 0, &goaway);
            let _ = tx.send(self.out.split().freeze());
            tokio::spawn(linger(rd));
        }
        drop(tx);
        let goaway = self.last_stream_id.is_some();
        (self.record(end), goaway)
    }

    /// The lowest stream still awaited, or `None` when the connection can close: streams above the last
    /// stream id are not awaited (the server said it will not process them), and neither is opening
    /// more once that is no longer allowed.
    fn waiting_for(&self) -> Option<u32> {
        let awaited = self.active.keys().copied().find(|&id| self.last_stream_id.is_none_or(|last| id <= last));
        match awaited {
            Some(id) => Some(id),
            None if self.may_open() => Some(self.next_id),
            None => None,
        }
    }

    fn may_open(&self) -> bool {
        self.last_stream_id.is_none() && Instant::now() < self.shared.stop_at && self.next_id <= MAX_STREAM_ID
    }

    fn open_streams(&mut self) {
        let limit = self.shared.opts.streams.min(self.server_max.map_or(usize::MAX, |m| m as usize));
        while self.may_open() && self.active.len() < limit {
            let id = self.next_id;
            self.next_id += 2;
            let block = get_block(&self.shared.opts.path, &self.shared.opts.authority);
            self.frame(HEADERS, END_STREAM | END_HEADERS, id, &block);
            let s = Stream { status: Status::None, end_stream: false, reset: None, data_frames: 0, data_bytes: 0 };
            self.active.insert(id, s);
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        put_frame(&mut self.out, kind, flags, stream, payload);
    }

    fn event(&mut self, what: String) {
        if self.events.len() < MAX_EVENTS {
            let ms = self.started.elapsed().as_millis();
            self.events.push(format!("{what} @{ms}ms"));
        }
    }

    fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: Bytes) {
        match kind {
            DATA => {
                let len = payload.len() as u32;
                let mut open = false;
                if let Some(s) = self.active.get_mut(&stream) {
                    s.data_frames += 1;
                    s.data_bytes += u64::from(len);
                    open = flags & END_STREAM == 0;
                }
                // Every byte of the payload (padding too) counts against both windows: give it back as
                // a client that consumed it does.
                if len > 0 {
                    self.frame(WINDOW_UPDATE, 0, 0, &len.to_be_bytes());
                    if open {
                        self.frame(WINDOW_UPDATE, 0, stream, &len.to_be_bytes());
                    }
                }
                if flags & END_STREAM != 0 {
                    self.finish(stream);
                }
            }
            HEADERS => {
                let Some(fragment) = headers_fragment(flags, payload) else { return };
                let end_stream = flags & END_STREAM != 0;
                if let Some(s) = self.active.get_mut(&stream) {
                    if s.status == Status::None {
                        s.status = match fragment.first() {
                            Some(&b) => status_of(b),
                            None => Status::Pending,
                        };
                    }
                }
                if flags & END_HEADERS == 0 {
                    self.continuation = Some((stream, end_stream));
                } else {
                    self.headers_done(stream, end_stream);
                }
            }
            CONTINUATION => {
                // CONTINUATION has neither padding nor priority (RFC 9113 §6.10): all payload is fragment.
                if let Some(s) = self.active.get_mut(&stream) {
                    if s.status == Status::Pending {
                        if let Some(&b) = payload.first() {
                            s.status = status_of(b);
                        }
                    }
                }
                if flags & END_HEADERS != 0 {
                    let end_stream = self.continuation.take().is_some_and(|(id, end)| id == stream && end);
                    self.headers_done(stream, end_stream);
                }
            }
            RST_STREAM if payload.len() >= 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if let Some(mut s) = self.active.remove(&stream) {
                    s.reset = Some(code);
                    self.ended.push((stream, s));
                }
            }
            SETTINGS if flags & ACK == 0 => {
                for setting in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                        self.server_max = Some(value);
                    }
                }
                self.frame(SETTINGS, ACK, 0, &[]);
            }
            PING if flags & ACK == 0 => {
                // Answered at once: hyper sends its final GOAWAY only once this PING comes back.
                self.frame(PING, ACK, 0, &payload);
                self.event("PING".into());
            }
            GOAWAY if payload.len() >= 8 => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_STREAM_ID;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                if self.last_stream_id.is_none() {
                    self.shared.progress.send_modify(|p| p.goaways += 1);
                }
                self.last_stream_id = Some(last);
                let code = if code == 0 { String::new() } else { format!(" {}", error_name(code)) };
                self.event(format!("GOAWAY {last}{code}"));
            }
            _ => {}
        }
    }

    fn headers_done(&mut self, stream: u32, end_stream: bool) {
        if let Some(s) = self.active.get_mut(&stream) {
            if s.status == Status::Pending {
                s.status = Status::Other(None);
            }
        }
        if end_stream {
            self.finish(stream);
        }
    }

    /// END_STREAM arrived on `stream`.
    fn finish(&mut self, stream: u32) {
        let Some(mut s) = self.active.remove(&stream) else { return };
        s.end_stream = true;
        if s.status == Status::Ok {
            self.completed.push(stream);
            self.shared.progress.send_modify(|p| p.completed += 1);
        } else {
            self.ended.push((stream, s));
        }
    }

    /// Classifies every opened stream into the shared report; returns how many completed.
    fn record(self, end: End) -> u64 {
        let last = self.last_stream_id.unwrap_or(MAX_STREAM_ID);
        let (mut refused, mut broken) = (0u64, Vec::new());
        let mut anomalies = Vec::new();
        for &id in self.completed.iter().filter(|&&id| id > last) {
            anomalies.push(format!("conn {}: stream {id} completed above last_stream_id {last}", self.id));
        }
        let unfinished = self.active.iter().map(|(id, s)| (*id, s));
        for (id, s) in self.ended.iter().map(|(id, s)| (*id, s)).chain(unfinished) {
            if id > last && s.status != Status::None {
                anomalies.push(format!("conn {}: stream {id} answered above last_stream_id {last}", self.id));
            }
            if id > last || s.reset == Some(REFUSED_STREAM) {
                refused += 1;
            } else {
                broken.push(format!("stream {id}: {}", describe(s, &end)));
            }
        }
        let completed = self.completed.len() as u64;
        let mut r = self.shared.report.lock().unwrap();
        r.completed += completed;
        if self.moved {
            r.completed_after_goaway += completed;
        }
        r.refused += refused;
        r.broken += broken.len() as u64;
        if self.last_stream_id.is_some() {
            r.goaways += 1;
        }
        if !broken.is_empty() && r.broken_samples.len() < MAX_SAMPLES {
            let n = broken.len();
            broken.truncate(4);
            let more = if n > broken.len() { format!("; and {} more", n - broken.len()) } else { String::new() };
            let last = self.last_stream_id.map_or("none".into(), |l| l.to_string());
            r.broken_samples.push(format!(
                "conn {} ({} ms, {} opened, {} completed; last_stream_id {last}; seen: {}{}{end}): {}{more}",
                self.id,
                self.started.elapsed().as_millis(),
                (self.next_id - 1) / 2,
                completed,
                self.events.join(", "),
                if self.events.is_empty() { "" } else { ", then " },
                broken.join("; "),
            ));
        }
        let room = MAX_SAMPLES.saturating_sub(r.anomalies.len());
        r.anomalies.extend(anomalies.into_iter().take(room));
        completed
    }
}

/// What one stream saw, e.g. `HEADERS 200, 3 DATA (49152 B), then EOF`.
fn describe(s: &Stream, end: &End) -> String {
    let mut d = match s.status {
        Status::None => "no HEADERS".to_string(),
        Status::Ok => "HEADERS 200".to_string(),
        Status::Pending | Status::Other(None) => "HEADERS without :status".to_string(),
        Status::Other(Some(b)) => match b {
            0x89..=0x8e => format!("HEADERS {}", [204, 206, 304, 400, 404, 500][(b - 0x89) as usize]),
            _ => format!("HEADERS non-200 (first byte {b:#04x})"),
        },
    };
    if s.data_frames > 0 {
        let _ = write!(d, ", {} DATA ({} B)", s.data_frames, s.data_bytes);
    }
    match (s.reset, s.end_stream) {
        (Some(code), _) => {
            let _ = write!(d, ", then RST_STREAM {}", error_name(code));
        }
        (None, true) => d.push_str(", END_STREAM"),
        (None, false) => {
            let _ = write!(d, ", then {end}");
        }
    }
    d
}

fn status_of(first: u8) -> Status {
    if first == STATUS_200 {
        Status::Ok
    } else {
        Status::Other(Some(first))
    }
}

/// The header block fragment of a HEADERS payload, without padding and priority fields.
fn headers_fragment(flags: u8, mut payload: Bytes) -> Option<Bytes> {
    let mut pad = 0;
    if flags & PADDED != 0 {
        if payload.is_empty() {
            return None;
        }
        pad = payload.get_u8() as usize;
    }
    if flags & PRIORITY != 0 {
        if payload.len() < 5 {
            return None;
        }
        payload.advance(5);
    }
    (pad <= payload.len()).then(|| payload.slice(..payload.len() - pad))
}

fn error_name(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES.get(code as usize).map_or_else(|| format!("{code:#x}"), |n| n.to_string())
}

/// Writes queued frames in order; when the queue closes, the write half is dropped (FIN).
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>, until: Instant) {
    let _ = tokio::time::timeout_at(until, async {
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Reads and discards until the server closes, for a bounded time.
async fn linger(mut rd: OwnedReadHalf) {
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER, async { while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
}
