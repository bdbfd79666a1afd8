//! The scaler against a simulated night: no cloud, no network. A trace (`data/night.json`)
//! gives the jobs (arrival, rows, deadline), the rows/s a worker manages over time (noisy), the
//! scheduled runs and the crashes; a world of instances and workers turns the scaler's
//! decisions into machines that boot, claim shards, process rows, drain and vanish, and shows
//! the scaler each tick what a coordinator and EC2 would. The checks read the world's truth,
//! not the scaler's view of it.

use std::path::Path;
use std::time::Duration;

use nightshift_fleet::{
    Decision, Instance, InstanceState, Observation, Policy, Reason, Removal, Scaler,
};
use nightshift_proto::wire::{WorkerLease, WorkerView};
use nightshift_proto::{CapacityType, FleetView, InstanceInfo, JobDemand};
use serde::Deserialize;

/// The world's start (ms since the epoch).
const START_MS: i64 = 1_750_000_000_000;
const MS_PER_S: i64 = 1000;
/// Simulated time between two decisions.
const TICK_MS: i64 = 15 * MS_PER_S;
/// A dead worker's leases expire this long after its last claim.
const LEASE_TTL_MS: i64 = 90 * MS_PER_S;
/// An instance's worker first claims between `BOOT_MIN_MS` and `BOOT_MIN_MS + BOOT_SPREAD_MS`
/// after its launch (the policy's `boot_time` is the slowest of them).
const BOOT_MIN_MS: i64 = 100 * MS_PER_S;
const BOOT_SPREAD_MS: i64 = 50 * MS_PER_S;
/// Instance `n` boots `n * BOOT_STEP_MS` (modulo the spread) after `BOOT_MIN_MS`: a step
/// prime to the spread, so that boot times scatter over it.
const BOOT_STEP_MS: i64 = 37 * MS_PER_S;
/// Instance `n`'s machine runs at `SPEEDS[n % 5]` times the trace's rate.
const SPEEDS: [f64; 5] = [0.9, 0.95, 1.0, 1.05, 1.1];
/// Instance `n`'s worker runs `SLOTS[n % 2]` shards at once.
const SLOTS: [u32; 2] = [1, 2];
/// A schedule's next run after one fires: tomorrow.
const DAY_MS: i64 = 24 * 3600 * MS_PER_S;
/// Ticks the fleet gets, after a window, to drain and terminate what it no longer needs.
const SETTLE_TICKS: i64 = 3;
/// Direction changes of `desired` allowed over the night: up and down for each job, the warm
/// pool and a few for the deadline's pressure; noise must not add more.
const MAX_DIRECTION_CHANGES: usize = 10;

#[derive(Debug, Deserialize)]
struct Trace {
    duration_s: i64,
    rows_per_shard: u64,
    rate: RateTrace,
    jobs: Vec<JobTrace>,
    scheduled_runs_s: Vec<i64>,
    kills: Vec<Kill>,
}

/// A worker's rows/s, one sample every `every_s` from the start.
#[derive(Debug, Deserialize)]
struct RateTrace {
    every_s: i64,
    rows_per_s: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct JobTrace {
    id: i64,
    arrive_s: i64,
    rows: u64,
    deadline_s: Option<i64>,
}

/// A crash, without a drain.
#[derive(Debug, Clone, Deserialize)]
struct Kill {
    at_s: i64,
    kind: KillKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KillKind {
    /// The worker process dies; its instance stays listed.
    Worker,
    /// The instance is reclaimed (spot), its worker with it.
    Instance,
}

fn load_trace() -> Trace {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/night.json");
    let text = std::fs::read_to_string(&path).expect("read the trace");
    serde_json::from_str(&text).expect("parse the trace")
}

fn at(s: i64) -> i64 {
    START_MS + s * MS_PER_S
}

fn policy() -> Policy {
    Policy {
        min_workers: 1,
        max_workers: 10,
        stabilization: Duration::from_secs(300),
        target_drain: Duration::from_secs(1800),
        boot_time: Duration::from_millis((BOOT_MIN_MS + BOOT_SPREAD_MS) as u64),
        default_rows_per_s: 400.0,
        warm_pool: 3,
        warm_ahead: Duration::from_secs(600),
        warm_hold: Duration::from_secs(300),
        lost_after: Duration::from_secs(60),
        launch_backoff: Duration::from_secs(300),
        launch_backoff_max: Duration::from_secs(1800),
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

// ---------------------------------------------------------------------------------------------
// The world.

struct Shard {
    job: usize,
    rows: u64,
    done: u64,
    holder: Option<usize>,
}

struct Job {
    id: i64,
    arrive_ms: i64,
    rows: u64,
    deadline_ms: Option<i64>,
    shards: Vec<usize>,
    finished_ms: Option<i64>,
}

struct Worker {
    id: String,
    last_seen_ms: i64,
    slots: u32,
    /// How fast this machine is against the trace's rate (`SPEEDS`).
    speed: f64,
    rows_per_s: f64,
    leases: Vec<usize>,
    draining: bool,
    /// Exited after a drain, or crashed (then `dead_ms` is set).
    exited: bool,
    dead_ms: Option<i64>,
}

/// An instance and the worker on it once booted.
struct Node {
    id: String,
    launched_ms: i64,
    boots_ms: i64,
    listed: bool,
    /// Killed by the trace (its instance or its worker).
    killed: bool,
    worker: Option<Worker>,
}

struct World {
    trace: Trace,
    jobs: Vec<Job>,
    shards: Vec<Shard>,
    nodes: Vec<Node>,
    now: i64,
}

impl World {
    fn new(trace: Trace) -> Self {
        let jobs = trace
            .jobs
            .iter()
            .map(|j| Job {
                id: j.id,
                arrive_ms: at(j.arrive_s),
                rows: j.rows,
                deadline_ms: j.deadline_s.map(at),
                shards: Vec::new(),
                finished_ms: None,
            })
            .collect();
        World {
            trace,
            jobs,
            shards: Vec::new(),
            nodes: Vec::new(),
            now: START_MS - TICK_MS,
        }
    }

    /// The trace's per-worker rows/s at `now`.
    fn rate(&self, now: i64) -> f64 {
        let r = &self.trace.rate;
        let i = ((now - START_MS) / (r.every_s * MS_PER_S)).max(0) as usize;
        r.rows_per_s[i.min(r.rows_per_s.len() - 1)]
    }

    /// Moves the world to `now`: jobs arrive, dead workers' leases expire, crashes happen,
    /// workers process a tick's rows (draining ones finish and exit), instances boot. Returns
    /// the crashes.
    fn advance(&mut self, now: i64) -> Vec<Crash> {
        let prev = self.now;
        self.now = now;
        self.arrive(prev, now);
        self.expire_leases(now);
        let kills: Vec<Kill> = self.trace.kills.clone();
        let kills: Vec<Crash> = (kills.iter())
            .filter(|k| prev < at(k.at_s) && at(k.at_s) <= now)
            .map(|k| self.kill(k, now))
            .collect();
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            if node.listed && node.worker.as_ref().is_some_and(|w| !w.exited) {
                self.work(n, now);
            }
        }
        self.boot(now);
        let shards = &self.shards;
        for job in &mut self.jobs {
            let done = job.shards.iter().all(|&s| shards[s].done == shards[s].rows);
            if job.arrive_ms <= now && job.finished_ms.is_none() && done {
                job.finished_ms = Some(now);
            }
        }
        kills
    }

    fn arrive(&mut self, prev: i64, now: i64) {
        let per_shard = self.trace.rows_per_shard;
        for (j, job) in self.jobs.iter_mut().enumerate() {
            if prev < job.arrive_ms && job.arrive_ms <= now {
                let mut left = job.rows;
                while left > 0 {
                    let rows = left.min(per_shard);
                    job.shards.push(self.shards.len());
                    self.shards.push(Shard {
                        job: j,
                        rows,
                        done: 0,
                        holder: None,
                    });
                    left -= rows;
                }
            }
        }
    }

    fn expire_leases(&mut self, now: i64) {
        for node in &mut self.nodes {
            let Some(w) = node.worker.as_mut() else {
                continue;
            };
            if w.dead_ms.is_some_and(|dead| dead + LEASE_TTL_MS <= now) {
                for s in w.leases.drain(..) {
                    self.shards[s].holder = None;
                }
            }
        }
    }

    /// Crashes the first serving worker holding a lease (or the first serving one).
    fn kill(&mut self, kill: &Kill, now: i64) -> Crash {
        let serving = |n: &Node| n.listed && n.worker.as_ref().is_some_and(|w| !w.exited);
        let busy = |n: &Node| n.worker.as_ref().is_some_and(|w| !w.leases.is_empty());
        let victim = (self.nodes.iter().position(|n| serving(n) && busy(n)))
            .or_else(|| self.nodes.iter().position(serving))
            .expect("a worker to kill");
        let node = &mut self.nodes[victim];
        node.killed = true;
        node.listed = kill.kind == KillKind::Worker;
        let w = node.worker.as_mut().expect("serving");
        w.exited = true;
        w.dead_ms = Some(now);
        w.rows_per_s = 0.0;
        Crash {
            at: now,
            kind: kill.kind,
            instance: node.id.clone(),
            held_leases: !w.leases.is_empty(),
        }
    }

    /// One tick of a worker: it fills its slots (unless draining) and processes rows at its
    /// rate, one shard after another; a draining worker then releases what is left and exits.
    fn work(&mut self, n: usize, now: i64) {
        let rate = self.rate(now);
        let mut w = self.nodes[n].worker.take().expect("a worker");
        let mut budget = (rate * w.speed * (TICK_MS / MS_PER_S) as f64) as u64;
        let mut did = 0;
        loop {
            if !w.draining {
                self.claim(n, &mut w);
            }
            let Some(&s) = w.leases.first() else { break };
            if budget == 0 {
                break;
            }
            let shard = &mut self.shards[s];
            let step = budget.min(shard.rows - shard.done);
            shard.done += step;
            budget -= step;
            did += step;
            if shard.done == shard.rows {
                shard.holder = None;
                w.leases.remove(0);
            }
        }
        w.rows_per_s = if did > 0 { rate * w.speed } else { 0.0 };
        w.last_seen_ms = now;
        if w.draining {
            for s in w.leases.drain(..) {
                self.shards[s].holder = None;
            }
            w.exited = true;
        }
        self.nodes[n].worker = Some(w);
    }

    /// Fills the worker's slots as the coordinator serves claims: the job holding the fewest
    /// leased shards first, then the oldest.
    fn claim(&mut self, n: usize, w: &mut Worker) {
        while w.leases.len() < w.slots as usize {
            let leased = |j: usize| {
                let job: &Job = &self.jobs[j];
                job.shards
                    .iter()
                    .filter(|&&s| self.shards[s].holder.is_some())
                    .count()
            };
            let pick = (0..self.shards.len())
                .filter(|&s| self.shards[s].holder.is_none())
                .filter(|&s| self.shards[s].done < self.shards[s].rows)
                .min_by_key(|&s| (leased(self.shards[s].job), self.shards[s].job, s));
            let Some(s) = pick else { return };
            self.shards[s].holder = Some(n);
            w.leases.push(s);
        }
    }

    /// Instances whose boot time has come get their worker, which claims at once.
    fn boot(&mut self, now: i64) {
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            if !node.listed || node.worker.is_some() || node.boots_ms > now {
                continue;
            }
            let mut w = Worker {
                id: format!("w-{n}"),
                last_seen_ms: now,
                slots: SLOTS[n % SLOTS.len()],
                speed: SPEEDS[n % SPEEDS.len()],
                rows_per_s: 0.0,
                leases: Vec::new(),
                draining: false,
                exited: false,
                dead_ms: None,
            };
            self.claim(n, &mut w);
            self.nodes[n].worker = Some(w);
        }
    }

    /// What the scaler sees: the coordinator's fleet view and the provider's instance list.
    fn observe(&self) -> Observation {
        let now = self.now;
        let jobs = self
            .jobs
            .iter()
            .filter(|j| j.arrive_ms <= now && j.finished_ms.is_none())
            .map(|j| JobDemand {
                job_id: j.id,
                rows_pending: j
                    .shards
                    .iter()
                    .map(|&s| self.shards[s].rows - self.shards[s].done)
                    .sum(),
                shards_open: j
                    .shards
                    .iter()
                    .filter(|&&s| self.shards[s].done < self.shards[s].rows)
                    .count() as u64,
                deadline_ms: j.deadline_ms,
            })
            .collect();
        let mut runs: Vec<i64> = (self.trace.scheduled_runs_s.iter())
            .map(|&s| if now < at(s) { at(s) } else { at(s) + DAY_MS })
            .collect();
        runs.sort_unstable();
        Observation {
            fleet: FleetView {
                now_ms: now,
                jobs,
                workers: self.worker_views(),
                scheduled_runs_ms: runs,
            },
            instances: self
                .nodes
                .iter()
                .filter(|n| n.listed)
                .map(instance_of)
                .collect(),
        }
    }

    /// Workers of listed instances, and crashed ones whose instance is gone while they still
    /// hold leases (a coordinator keeps them until the leases expire).
    fn worker_views(&self) -> Vec<WorkerView> {
        let mut views = Vec::new();
        for node in &self.nodes {
            let Some(w) = &node.worker else { continue };
            if !node.listed && w.leases.is_empty() {
                continue;
            }
            let leases = w.leases.iter().map(|&s| {
                let shard = &self.shards[s];
                WorkerLease {
                    job_id: self.jobs[shard.job].id,
                    shard_id: s as i64,
                    rows: shard.rows,
                    rows_done: shard.done,
                }
            });
            views.push(WorkerView {
                id: w.id.clone(),
                last_seen_ms: w.last_seen_ms,
                slots: Some(w.slots),
                rows_per_s: w.rows_per_s,
                leases: leases.collect(),
                gpus: Vec::new(),
                instance: Some(InstanceInfo {
                    id: node.id.clone(),
                    instance_type: "g5.xlarge".into(),
                    capacity_type: CapacityType::Spot,
                }),
                draining: w.draining,
                // The simulated coordinator tells a worker at its next claim, at once.
                drain_told: w.draining,
            });
        }
        views
    }

    /// Carries out a decision; returns the instances it launched.
    fn apply(&mut self, d: &Decision) -> Vec<String> {
        for (id, _) in &d.terminate {
            let node = self
                .nodes
                .iter_mut()
                .find(|n| &n.id == id)
                .expect("a listed instance");
            node.listed = false;
            if let Some(w) = node.worker.as_mut() {
                w.exited = true;
                for s in w.leases.drain(..) {
                    self.shards[s].holder = None;
                }
            }
        }
        for id in &d.drain {
            let mut workers = self.nodes.iter_mut().filter_map(|n| n.worker.as_mut());
            workers.find(|w| &w.id == id).expect("a worker").draining = true;
        }
        let mut launched = Vec::new();
        for _ in 0..d.launch {
            let n = self.nodes.len() as i64;
            let id = format!("i-{n}");
            self.nodes.push(Node {
                id: id.clone(),
                launched_ms: self.now,
                boots_ms: self.now + BOOT_MIN_MS + (n * BOOT_STEP_MS) % BOOT_SPREAD_MS,
                listed: true,
                killed: false,
                worker: None,
            });
            launched.push(id);
        }
        launched
    }

    /// Terminations of instances a worker of which holds a lease (the world's truth).
    fn leased_terminations(&self, d: &Decision) -> Vec<String> {
        d.terminate
            .iter()
            .filter(|(id, _)| {
                let node = self.nodes.iter().find(|n| &n.id == id);
                node.and_then(|n| n.worker.as_ref())
                    .is_some_and(|w| !w.leases.is_empty())
            })
            .map(|(id, why)| format!("{id} terminated ({why:?}) holding a lease"))
            .collect()
    }

    /// Listed instances the trace did not kill.
    fn live(&self) -> u32 {
        self.nodes.iter().filter(|n| n.listed && !n.killed).count() as u32
    }

    /// Workers claiming and not draining.
    fn serving(&self) -> u32 {
        let serving = |n: &&Node| n.worker.as_ref().is_some_and(|w| !w.exited && !w.draining);
        self.nodes
            .iter()
            .filter(|n| n.listed)
            .filter(serving)
            .count() as u32
    }

    fn queue_empty(&self) -> bool {
        self.jobs
            .iter()
            .all(|j| j.arrive_ms > self.now || j.finished_ms.is_some())
    }
}

fn instance_of(node: &Node) -> Instance {
    Instance {
        id: node.id.clone(),
        instance_type: "g5.xlarge".into(),
        capacity_type: CapacityType::Spot,
        state: if node.worker.is_some() {
            InstanceState::Running
        } else {
            InstanceState::Pending
        },
        launched_ms: node.launched_ms,
    }
}

// ---------------------------------------------------------------------------------------------
// A night and its record.

/// One tick: the decision and the world's state when it was taken.
#[derive(Debug, Clone)]
struct Tick {
    now: i64,
    desired: u32,
    reason: Option<Reason>,
    launched: Vec<String>,
    drain: Vec<String>,
    terminate: Vec<(String, Removal)>,
    live: u32,
    serving: u32,
    queue_empty: bool,
}

/// How a job went (ms).
#[derive(Debug, Clone)]
struct JobEnd {
    id: i64,
    arrive: i64,
    deadline: Option<i64>,
    finished: Option<i64>,
}

/// A crash the world made.
#[derive(Debug, Clone)]
struct Crash {
    at: i64,
    kind: KillKind,
    instance: String,
    held_leases: bool,
}

struct Night {
    ticks: Vec<Tick>,
    jobs: Vec<JobEnd>,
    kills: Vec<Crash>,
    leased_terminations: Vec<String>,
}

fn simulate(policy: Policy) -> Night {
    let trace = load_trace();
    let end = at(trace.duration_s);
    let mut world = World::new(trace);
    let mut scaler = Scaler::new(policy);
    let mut night = Night {
        ticks: Vec::new(),
        jobs: Vec::new(),
        kills: Vec::new(),
        leased_terminations: Vec::new(),
    };
    let mut now = START_MS;
    while now <= end {
        let crashes = world.advance(now);
        night.kills.extend(crashes);
        let obs = world.observe();
        let d = scaler.decide(&obs);
        night
            .leased_terminations
            .extend(world.leased_terminations(&d));
        let (live, serving, queue_empty) = (world.live(), world.serving(), world.queue_empty());
        let launched = world.apply(&d);
        night.ticks.push(Tick {
            now,
            desired: d.desired,
            reason: d.reason,
            launched,
            drain: d.drain,
            terminate: d.terminate,
            live,
            serving,
            queue_empty,
        });
        now += TICK_MS;
    }
    night.jobs = (world.jobs.iter())
        .map(|j| JobEnd {
            id: j.id,
            arrive: j.arrive_ms,
            deadline: j.deadline_ms,
            finished: j.finished_ms,
        })
        .collect();
    night
}

// ---------------------------------------------------------------------------------------------
// The checks: each returns what it found wrong.

/// (a) Scale-down (a drain or an `Unneeded` termination) within `window` after a launch.
fn downs_after_launch(ticks: &[Tick], window: Duration) -> Vec<String> {
    let mut last_launch = None;
    let mut found = Vec::new();
    for t in ticks {
        let unneeded = t.terminate.iter().any(|(_, r)| *r == Removal::Unneeded);
        let down = !t.drain.is_empty() || unneeded;
        if let Some(launch) = last_launch.filter(|&l| down && t.now - l <= ms(window)) {
            found.push(format!(
                "scale-down at {} s, {} s after a launch",
                secs(t.now),
                (t.now - launch) / MS_PER_S
            ));
        }
        if !t.launched.is_empty() {
            last_launch = Some(t.now);
        }
    }
    found
}

/// (a) How often `desired` turns from rising to falling or back.
fn direction_changes(ticks: &[Tick]) -> usize {
    let steps = ticks
        .windows(2)
        .map(|w| i64::from(w[1].desired) - i64::from(w[0].desired));
    let signs: Vec<i64> = steps.filter(|&d| d != 0).map(i64::signum).collect();
    signs.windows(2).filter(|w| w[0] != w[1]).count()
}

/// (c) Jobs with a deadline that finished after it, or never.
fn missed_deadlines(night: &Night) -> Vec<String> {
    let mut found = Vec::new();
    for j in &night.jobs {
        let Some(deadline) = j.deadline else { continue };
        if j.finished.is_none_or(|f| f > deadline) {
            let finished = j.finished.map(secs);
            found.push(format!(
                "job {} due at {} s finished at {finished:?} s",
                j.id,
                secs(deadline)
            ));
        }
    }
    found
}

/// (d) Ticks, once the queue has been empty for the window and a few ticks, with more or
/// fewer live instances than `min_workers`; outside warm pools and a kill's recovery.
fn unsettled(ticks: &[Tick], policy: &Policy, runs: &[i64], kills: &[i64]) -> Vec<String> {
    let settle = ms(policy.stabilization) + SETTLE_TICKS * TICK_MS;
    let recovery = ms(policy.lost_after) + BOOT_MIN_MS + BOOT_SPREAD_MS + SETTLE_TICKS * TICK_MS;
    let warm = |now: i64| {
        let ahead = ms(policy.warm_ahead);
        let after = ms(policy.warm_hold) + settle;
        runs.iter().any(|&r| now >= r - ahead && now <= r + after)
    };
    let recovering = |now: i64| kills.iter().any(|&k| now >= k && now <= k + recovery);
    let mut empty_since = None;
    let mut found = Vec::new();
    for t in ticks {
        empty_since = if t.queue_empty {
            empty_since.or(Some(t.now))
        } else {
            None
        };
        let settled = empty_since.is_some_and(|e| t.now - e >= settle);
        if settled && !warm(t.now) && !recovering(t.now) && t.live != policy.min_workers {
            found.push(format!(
                "{} live instances at {} s, queue empty",
                t.live,
                secs(t.now)
            ));
        }
    }
    found
}

/// (d) Kills not followed by a launch within `lost_after` and two ticks, or whose instance
/// (when it stays listed) is not terminated as lost once its leases expire.
fn unreplaced(night: &Night, policy: &Policy) -> Vec<String> {
    let within = ms(policy.lost_after) + 2 * TICK_MS;
    let mut found = Vec::new();
    for c in &night.kills {
        let launched = (night.ticks.iter())
            .any(|t| t.now >= c.at && t.now <= c.at + within && !t.launched.is_empty());
        if !launched {
            let (kind, id, at) = (c.kind, &c.instance, secs(c.at));
            found.push(format!("{kind:?} kill of {id} at {at} s not replaced"));
        }
        let gone_by = c.at + ms(policy.lost_after).max(LEASE_TTL_MS) + 2 * TICK_MS;
        let lost = (night.ticks.iter().filter(|t| t.now <= gone_by))
            .any(|t| t.terminate.contains(&(c.instance.clone(), Removal::Lost)));
        if c.kind == KillKind::Worker && !lost {
            let (id, at) = (&c.instance, secs(c.at));
            found.push(format!(
                "{id}, its worker killed at {at} s, not terminated as lost"
            ));
        }
    }
    found
}

/// Scheduled runs that found fewer than `warm_pool` workers serving.
fn cold_runs(ticks: &[Tick], policy: &Policy, runs: &[i64]) -> Vec<String> {
    let cold = |&r: &&i64| {
        let tick = ticks.iter().find(|t| t.now >= *r);
        tick.is_some_and(|t| t.serving < policy.warm_pool)
    };
    runs.iter()
        .filter(cold)
        .map(|r| format!("run at {} s found the pool cold", secs(*r)))
        .collect()
}

fn secs(ms: i64) -> i64 {
    (ms - START_MS) / MS_PER_S
}

fn summary(label: &str, night: &Night) {
    let launches: usize = night.ticks.iter().map(|t| t.launched.len()).sum();
    let drains: usize = night.ticks.iter().map(|t| t.drain.len()).sum();
    let peak = night.ticks.iter().map(|t| t.live).max().unwrap_or(0);
    let mut removals = std::collections::BTreeMap::new();
    for (_, why) in night.ticks.iter().flat_map(|t| &t.terminate) {
        *removals.entry(why.as_str()).or_insert(0) += 1;
    }
    println!(
        "{label}: peak {peak} instances, {launches} launches, {drains} drains, terminated {removals:?}, {} direction changes",
        direction_changes(&night.ticks)
    );
    for j in &night.jobs {
        let due = j
            .deadline
            .map(|d| format!(", due {} s", secs(d)))
            .unwrap_or_default();
        let finished = j.finished.map(secs);
        println!(
            "  job {}: arrived {} s{due}, finished {finished:?} s",
            j.id,
            secs(j.arrive)
        );
    }
}

fn runs_ms() -> Vec<i64> {
    load_trace()
        .scheduled_runs_s
        .iter()
        .map(|&s| at(s))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn a_night_meets_every_check() {
    let policy = policy();
    let night = simulate(policy.clone());
    summary("night", &night);
    assert_eq!(night.kills.len(), 3, "crashes: {:?}", night.kills);
    assert!(
        night.kills.iter().any(|k| k.held_leases),
        "a crash held leases"
    );
    let kills: Vec<i64> = night.kills.iter().map(|k| k.at).collect();
    none(night.leased_terminations.clone());
    none(downs_after_launch(&night.ticks, policy.stabilization));
    let changes = direction_changes(&night.ticks);
    assert!(
        changes <= MAX_DIRECTION_CHANGES,
        "{changes} direction changes"
    );
    none(missed_deadlines(&night));
    assert!(
        night.jobs.iter().all(|j| j.finished.is_some()),
        "{:?}",
        night.jobs
    );
    none(unsettled(&night.ticks, &policy, &runs_ms(), &kills));
    none(unreplaced(&night, &policy));
    none(cold_runs(&night.ticks, &policy, &runs_ms()));
    let last = night.ticks.last().expect("ticks");
    let min = policy.min_workers;
    assert_eq!((last.live, last.desired), (min, min), "back to the minimum");
    let deadline = |t: &Tick| t.reason == Some(Reason::Deadline);
    assert!(night.ticks.iter().any(deadline), "the deadline rule acted");
}

/// Fails with what a check found.
#[track_caller]
fn none(found: Vec<String>) {
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn too_few_workers_miss_the_deadline() {
    let policy = Policy {
        max_workers: 2,
        ..policy()
    };
    let night = simulate(policy);
    summary("max 2", &night);
    assert_eq!(night.leased_terminations, Vec::<String>::new());
    let missed = missed_deadlines(&night);
    assert_eq!(missed.len(), 1, "{missed:?}");
}

#[test]
fn without_a_window_the_fleet_flaps() {
    let policy = Policy {
        stabilization: Duration::ZERO,
        ..policy()
    };
    let night = simulate(policy);
    summary("no window", &night);
    assert_eq!(night.leased_terminations, Vec::<String>::new());
    let downs = downs_after_launch(&night.ticks, self::policy().stabilization);
    let changes = direction_changes(&night.ticks);
    assert!(!downs.is_empty(), "no scale-down soon after a launch");
    assert!(
        changes > MAX_DIRECTION_CHANGES,
        "only {changes} direction changes"
    );
}

#[test]
fn the_checks_catch_what_they_look_for() {
    let policy = policy();
    let tick = |s: i64, desired: u32| Tick {
        now: at(s),
        desired,
        reason: None,
        launched: Vec::new(),
        drain: Vec::new(),
        terminate: Vec::new(),
        live: desired,
        serving: desired,
        queue_empty: true,
    };
    let mut ticks: Vec<Tick> = (0..40).map(|i| tick(i * 15, policy.min_workers)).collect();
    ticks[1].launched = vec!["i-9".into()];
    ticks[3].drain = vec!["w-9".into()];
    assert_eq!(downs_after_launch(&ticks, policy.stabilization).len(), 1);
    ticks[30].live = 2;
    assert_eq!(unsettled(&ticks, &policy, &[], &[]).len(), 1);
    for (i, d) in [1, 2, 1, 2, 1].into_iter().enumerate() {
        ticks[i + 10].desired = d;
    }
    assert_eq!(direction_changes(&ticks), 3);
    assert_eq!(cold_runs(&ticks, &policy, &[at(60)]).len(), 1);

    let night = Night {
        ticks,
        jobs: [Some(at(115)), None]
            .into_iter()
            .map(|finished| JobEnd {
                id: 2,
                arrive: at(0),
                deadline: Some(at(100)),
                finished,
            })
            .collect(),
        kills: vec![Crash {
            at: at(200),
            kind: KillKind::Worker,
            instance: "i-4".into(),
            held_leases: false,
        }],
        leased_terminations: Vec::new(),
    };
    assert_eq!(missed_deadlines(&night).len(), 2);
    assert_eq!(
        unreplaced(&night, &policy).len(),
        2,
        "neither launched nor terminated"
    );
}

#[test]
fn the_lease_check_catches_a_leased_termination() {
    let mut world = World::new(load_trace());
    world.advance(START_MS);
    world.nodes.push(Node {
        id: "i-0".into(),
        launched_ms: START_MS,
        boots_ms: START_MS,
        listed: true,
        killed: false,
        worker: None,
    });
    world.boot(START_MS);
    let bad = Decision {
        terminate: vec![("i-0".into(), Removal::Unneeded)],
        ..Decision::default()
    };
    assert_eq!(
        world.leased_terminations(&bad).len(),
        1,
        "the new worker holds a lease"
    );
}
