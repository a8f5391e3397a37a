//! The load itself: generator threads, each a current-thread runtime with
//! its own connections and its own recorder, so nothing is shared on the
//! hot path.
//!
//! Two shapes of load:
//! - **open loop** (`--rate`): a pacer thread hands out intended send times
//!   on a fixed schedule, whatever the server does. Latency is measured from
//!   the intended time, so a server that stalls is charged for every request
//!   that should have been sent meanwhile (coordinated omission corrected).
//!   A request waits for a free keep-alive connection, or opens one, up to
//!   `--connections`.
//! - **closed loop** (`--concurrency`): each virtual user sends its next
//!   request when the previous answer is complete, on its own connection.
//!   This finds the maximum throughput; its latencies hide stalls, as every
//!   closed loop does.
//!
//! Only requests whose (intended) start falls inside the measurement
//! window, after the warm-up, are recorded; requests still running when the
//! window closes are waited for, up to the drain bound (`Plan::drain`).
//! Each recorded request is counted once when it starts (`sent`) and once
//! when it ends (`ok` or an error kind); one still running at the drain
//! bound is counted `unanswered`, so `sent = ok + errors + unanswered`
//! holds by two independent counts, not by construction.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;
use tokio::task::LocalSet;

use crate::record::Recorder;
use crate::request::RequestTemplate;
use crate::wire::{self, Connection};

/// How requests are issued.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// A fixed request rate per second, at most `max_connections` open.
    Open { rate: f64, max_connections: usize },
    /// A fixed number of requests in flight, one connection each.
    Closed { concurrency: usize },
}

/// One run's shape.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub load: Load,
    /// Load before the measurement window; nothing sent in it is recorded.
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// Read answers as SSE streams: first chunk and chunk gaps recorded.
    pub stream: bool,
    /// Generator threads.
    pub threads: usize,
    /// Longest one request may take once sent.
    pub timeout: Duration,
}

impl Plan {
    /// How long after the window the requests still running are waited
    /// for: a request's connect and its exchange are each bounded by the
    /// timeout, so past both (and a second more) one still running is stuck
    /// and is counted unanswered.
    pub fn drain(&self) -> Duration {
        self.timeout.saturating_mul(2) + Duration::from_secs(1)
    }
}

/// The run's clock: load from `start`, recorded from `measure_from`, no new
/// request from `end`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

/// What the generator threads measured, merged.
pub struct Outcome {
    pub recorder: Recorder,
    /// Most requests in flight at once (summed over threads).
    pub max_inflight: usize,
    /// TCP connections opened, warm-up included.
    pub connections: u64,
}

/// A run in progress; `finish` waits for it.
pub struct Running {
    pub window: Window,
    workers: Vec<JoinHandle<Result<WorkerOutcome, String>>>,
    pacer: Option<JoinHandle<()>>,
}

impl Running {
    /// Waits for every thread and merges what they measured.
    pub fn finish(self) -> Result<Outcome, String> {
        if let Some(pacer) = self.pacer {
            pacer
                .join()
                .map_err(|_| "the pacer thread failed".to_owned())?;
        }
        let mut merged = Recorder::new()?;
        let (mut max_inflight, mut connections) = (0, 0);
        for worker in self.workers {
            let outcome = worker
                .join()
                .map_err(|_| "a generator thread failed".to_owned())??;
            merged.merge(&outcome.recorder);
            max_inflight += outcome.max_inflight;
            connections += outcome.connections;
        }
        Ok(Outcome {
            recorder: merged,
            max_inflight,
            connections,
        })
    }
}

/// Starts the generator threads (and the pacer, for an open loop); the
/// load begins a few milliseconds later, once every thread is up.
pub fn start(plan: Plan, template: Arc<RequestTemplate>) -> Result<Running, String> {
    let threads = plan.threads.max(1);
    let start = Instant::now() + Duration::from_millis(50);
    let window = Window {
        start,
        measure_from: start + plan.warmup,
        end: start + plan.warmup + plan.duration,
    };
    let mut workers = Vec::with_capacity(threads);
    let mut schedules = Vec::with_capacity(threads);
    for index in 0..threads {
        let job = match plan.load {
            Load::Open {
                max_connections, ..
            } => {
                let (sender, receiver) = mpsc::unbounded_channel();
                schedules.push(sender);
                Job::Open {
                    schedule: receiver,
                    max_connections: share(max_connections, threads, index).max(1),
                }
            }
            Load::Closed { concurrency } => Job::Closed {
                users: share(concurrency, threads, index),
            },
        };
        let template = template.clone();
        let worker = std::thread::Builder::new()
            .name(format!("loadtest-{index}"))
            .spawn(move || run_worker(plan, window, job, template))
            .map_err(|err| format!("cannot start a generator thread: {err}"))?;
        workers.push(worker);
    }
    let pacer = match plan.load {
        Load::Open { rate, .. } => Some(
            std::thread::Builder::new()
                .name("loadtest-pacer".to_owned())
                .spawn(move || pace(rate, window, schedules))
                .map_err(|err| format!("cannot start the pacer thread: {err}"))?,
        ),
        Load::Closed { .. } => None,
    };
    Ok(Running {
        window,
        workers,
        pacer,
    })
}

/// Thread `index`'s part of `total`, the remainder going to the first ones.
fn share(total: usize, threads: usize, index: usize) -> usize {
    total / threads + usize::from(index < total % threads)
}

/// Hands intended send times to the threads in turn, on schedule. A late
/// pacer sends the overdue ones at once, keeping their intended times, so
/// its lateness is charged to the latency and never silently dropped.
fn pace(rate: f64, window: Window, schedules: Vec<UnboundedSender<Instant>>) {
    if schedules.is_empty() || rate.is_nan() || rate <= 0.0 {
        return;
    }
    let total = window.end.saturating_duration_since(window.start);
    for n in 0u64.. {
        let offset = Duration::from_secs_f64(n as f64 / rate);
        if offset >= total {
            break;
        }
        let intended = window.start + offset;
        let now = Instant::now();
        if intended > now {
            // A thread sleep wakes within tens of microseconds; the async
            // timer's millisecond ticks would blur the latency measured.
            std::thread::sleep(intended - now);
        }
        let to = usize::try_from(n % schedules.len() as u64).unwrap_or(0);
        if let Some(schedule) = schedules.get(to) {
            if schedule.send(intended).is_err() {
                break;
            }
        }
    }
}

enum Job {
    Open {
        schedule: UnboundedReceiver<Instant>,
        max_connections: usize,
    },
    Closed {
        users: usize,
    },
}

struct WorkerOutcome {
    recorder: Recorder,
    max_inflight: usize,
    connections: u64,
}

/// One generator thread's state, shared by its tasks (never across threads).
struct Worker {
    plan: Plan,
    window: Window,
    template: Arc<RequestTemplate>,
    recorder: RefCell<Recorder>,
    rng: RefCell<fastrand::Rng>,
    inflight: Cell<usize>,
    max_inflight: Cell<usize>,
    connections: Cell<u64>,
    /// Recorded requests started and not yet counted as ended.
    open: Cell<u64>,
}

fn run_worker(
    plan: Plan,
    window: Window,
    job: Job,
    template: Arc<RequestTemplate>,
) -> Result<WorkerOutcome, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start a runtime: {err}"))?;
    let worker = Rc::new(Worker {
        plan,
        window,
        template,
        recorder: RefCell::new(Recorder::new()?),
        rng: RefCell::new(fastrand::Rng::new()),
        inflight: Cell::new(0),
        max_inflight: Cell::new(0),
        connections: Cell::new(0),
        open: Cell::new(0),
    });
    let local = LocalSet::new();
    local.block_on(&runtime, {
        let worker = worker.clone();
        async move {
            match job {
                Job::Open {
                    schedule,
                    max_connections,
                } => open_loop(worker, schedule, max_connections).await,
                Job::Closed { users } => closed_loop(worker, users).await,
            }
        }
    });
    // Connection tasks end here; every request task has finished.
    drop(local);
    let worker =
        Rc::try_unwrap(worker).map_err(|_| "a request task outlived its run".to_owned())?;
    Ok(WorkerOutcome {
        recorder: worker.recorder.into_inner(),
        max_inflight: worker.max_inflight.get(),
        connections: worker.connections.get(),
    })
}

/// Starts one task per scheduled request; returns when all have finished.
async fn open_loop(
    worker: Rc<Worker>,
    mut schedule: UnboundedReceiver<Instant>,
    max_connections: usize,
) {
    let idle: Rc<RefCell<Vec<Connection>>> = Rc::default();
    let permits = Rc::new(Semaphore::new(max_connections));
    while let Some(intended) = schedule.recv().await {
        let (worker, idle, permits) = (worker.clone(), idle.clone(), permits.clone());
        // Counted before the task first runs, so the wait below sees it.
        let busy = worker.busy();
        let measured = intended >= worker.window.measure_from;
        if measured {
            worker.sent();
        }
        tokio::task::spawn_local(async move {
            let _busy = busy;
            // Waiting for a connection is part of the latency.
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let idle_connection = idle.borrow_mut().pop();
            let connection = match idle_connection {
                Some(connection) => Ok(connection),
                None => worker.connect().await,
            };
            let result = match connection {
                Ok(mut connection) => {
                    if measured {
                        worker
                            .recorder
                            .borrow_mut()
                            .schedule_lag
                            .record(intended.elapsed());
                    }
                    let (result, reusable) =
                        worker.exchange(&mut connection, intended, measured).await;
                    if reusable {
                        idle.borrow_mut().push(connection);
                    }
                    result
                }
                Err(kind) => Err(kind),
            };
            if measured {
                worker.count(result);
            }
        });
    }
    drain(&worker).await;
}

/// The load is over: waits for the requests still running, up to the drain
/// bound, then counts those that have not ended as unanswered.
async fn drain(worker: &Worker) {
    let deadline = worker.window.end + worker.plan.drain();
    while worker.inflight.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    worker.recorder.borrow_mut().unanswered = worker.open.get();
}

/// Runs `users` virtual users to the end of the window.
async fn closed_loop(worker: Rc<Worker>, users: usize) {
    tokio::time::sleep_until(worker.window.start.into()).await;
    for _ in 0..users {
        // Counted before the task first runs, so the drain sees it.
        let busy = worker.busy();
        tokio::task::spawn_local(virtual_user(worker.clone(), busy));
    }
    drain(&worker).await;
}

/// One request at a time on one connection, reconnecting after a failure.
async fn virtual_user(worker: Rc<Worker>, busy: Busy) {
    let _busy = busy;
    let mut kept: Option<Connection> = None;
    loop {
        let started = Instant::now();
        if started >= worker.window.end {
            break;
        }
        let measured = started >= worker.window.measure_from;
        if measured {
            worker.sent();
        }
        let connection = match kept.take() {
            Some(connection) => Ok(connection),
            None => worker.connect().await,
        };
        let result = match connection {
            Ok(mut connection) => {
                let (result, reusable) = worker.exchange(&mut connection, started, measured).await;
                if reusable {
                    kept = Some(connection);
                }
                result
            }
            Err(kind) => {
                // Refused: do not spin on a server that is not there.
                tokio::time::sleep(Duration::from_millis(10)).await;
                Err(kind)
            }
        };
        if measured {
            worker.count(result);
        }
    }
}

/// Counts a request in flight while alive.
struct Busy(Rc<Worker>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get().saturating_sub(1));
    }
}

impl Worker {
    fn busy(self: &Rc<Self>) -> Busy {
        let inflight = self.inflight.get() + 1;
        self.inflight.set(inflight);
        self.max_inflight.set(self.max_inflight.get().max(inflight));
        Busy(self.clone())
    }

    /// A recorded request starts: it must end in `count` or be unanswered.
    fn sent(&self) {
        self.recorder.borrow_mut().sent += 1;
        self.open.set(self.open.get() + 1);
    }

    /// A recorded request ended, answered 2xx or failed with `kind`.
    fn count(&self, result: Result<(), String>) {
        self.open.set(self.open.get().saturating_sub(1));
        let mut recorder = self.recorder.borrow_mut();
        match result {
            Ok(()) => recorder.ok += 1,
            Err(kind) => recorder.error(&kind),
        }
    }

    /// A new keep-alive connection.
    async fn connect(&self) -> Result<Connection, String> {
        let connection =
            tokio::time::timeout(self.plan.timeout, Connection::open(self.template.addr))
                .await
                .map_err(|_| "connect_timeout".to_owned())?
                .map_err(|_| "connect".to_owned())?;
        self.connections.set(self.connections.get() + 1);
        Ok(connection)
    }

    /// Sends one request and reads its whole answer, recording its timings
    /// from `started` when `measured`. `Ok` only for a 2xx answer read to
    /// its end; also whether the connection may carry the next request.
    async fn exchange(
        &self,
        connection: &mut Connection,
        started: Instant,
        measured: bool,
    ) -> (Result<(), String>, bool) {
        let user = self.rng.borrow_mut().usize(..self.template.user_count());
        let mut reads = BodyReads::new(self.plan.stream, measured);
        let exchange = async {
            self.template.write(user, &mut connection.request);
            let mut answered = connection
                .exchange(|data| reads.read(data, started, &self.recorder))
                .await;
            if answered == Err(wire::CLOSED) && connection.used() {
                // The server ended the idle keep-alive connection (it may
                // at any time): the request goes again on a new one.
                let request = std::mem::take(&mut connection.request);
                *connection = self.connect().await?;
                connection.request = request;
                answered = connection
                    .exchange(|data| reads.read(data, started, &self.recorder))
                    .await;
            }
            answered.map_err(str::to_owned)
        };
        let answered = match tokio::time::timeout(self.plan.timeout, exchange).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(kind)) => return (Err(kind), false),
            Err(_) => return (Err("timeout".to_owned()), false),
        };
        let result = if !(200..300).contains(&answered.status) {
            Err(format!("status_{}", answered.status))
        } else if reads.error_event {
            // A stream that broke off after its 200: the gateway ends it
            // with an SSE error event, which is a failure.
            Err("stream_error".to_owned())
        } else {
            if measured {
                let mut recorder = self.recorder.borrow_mut();
                recorder.latency.record(started.elapsed());
                recorder.events += reads.events;
                recorder.body_bytes += reads.bytes;
            }
            Ok(())
        };
        (result, answered.reusable)
    }
}

/// The line that starts an SSE error event (the gateway's way to end a
/// stream that broke off after its 200).
const ERROR_EVENT: &[u8] = b"event: error";

/// Tracks one answer's body as it arrives.
struct BodyReads {
    /// Record first chunk and gaps (streams inside the window).
    timed: bool,
    /// Look for an SSE error event (streams).
    stream: bool,
    /// An SSE error event was read.
    error_event: bool,
    /// The end of the previous read, so an error event split between two
    /// reads is still seen.
    carry: Vec<u8>,
    last: Option<Instant>,
    /// The previous read ended in `\n`: a `\n` at the start of the next
    /// one ends an event.
    pending_newline: bool,
    events: u64,
    bytes: u64,
}

impl BodyReads {
    fn new(stream: bool, measured: bool) -> Self {
        Self {
            timed: stream && measured,
            stream,
            error_event: false,
            carry: Vec::new(),
            last: None,
            pending_newline: false,
            events: 0,
            bytes: 0,
        }
    }

    fn read(&mut self, data: &[u8], started: Instant, recorder: &RefCell<Recorder>) {
        if data.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.timed {
            let mut recorder = recorder.borrow_mut();
            match self.last {
                None => recorder.first_chunk.record(now - started),
                Some(last) => recorder.chunk_gap.record(now - last),
            }
        }
        self.last = Some(now);
        self.bytes += data.len() as u64;
        self.events += count_event_ends(data, &mut self.pending_newline);
        if self.stream && !self.error_event {
            self.error_event = find_error_event(&mut self.carry, data);
        }
    }
}

/// Whether `data`, after the `carry` left by the previous read, holds an
/// SSE error event; keeps the end of `data` in `carry` for the next read.
fn find_error_event(carry: &mut Vec<u8>, data: &[u8]) -> bool {
    carry.extend_from_slice(data);
    let found = carry
        .windows(ERROR_EVENT.len())
        .any(|window| window == ERROR_EVENT);
    let keep = ERROR_EVENT.len() - 1;
    if carry.len() > keep {
        carry.drain(..carry.len() - keep);
    }
    found
}

/// SSE events ended (`\n\n`) in `data`, carrying a trailing `\n` over to
/// the next read so an event split between reads is still counted once.
fn count_event_ends(data: &[u8], pending_newline: &mut bool) -> u64 {
    let mut events = 0;
    let mut previous_newline = *pending_newline;
    for &byte in data {
        let newline = byte == b'\n';
        if newline && previous_newline {
            events += 1;
            previous_newline = false;
        } else {
            previous_newline = newline;
        }
    }
    *pending_newline = previous_newline;
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_shared_with_the_remainder_first() {
        let shares: Vec<usize> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(shares, [4, 3, 3]);
        assert_eq!(share(1, 2, 1), 0);
    }

    #[test]
    fn events_split_across_reads_are_counted_once() {
        let mut pending = false;
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let (head, tail) = stream.split_at(cut);
            pending = false;
            let events =
                count_event_ends(head, &mut pending) + count_event_ends(tail, &mut pending);
            assert_eq!(events, 3, "cut at {cut}");
        }
        assert!(!pending);
        assert_eq!(count_event_ends(b"\n\n\n\n", &mut pending), 2);
    }

    #[test]
    fn an_error_event_split_across_reads_is_found() {
        let stream = b"data: {\"a\":1}\n\nevent: error\ndata: {\"error\":{}}\n\n";
        for cut in 0..stream.len() {
            let (head, tail) = stream.split_at(cut);
            let mut carry = Vec::new();
            let found = find_error_event(&mut carry, head) || find_error_event(&mut carry, tail);
            assert!(found, "cut at {cut}");
        }
        let mut carry = Vec::new();
        assert!(!find_error_event(
            &mut carry,
            b"data: {\"a\":1}\n\ndata: [DONE]\n\n"
        ));
    }
}
