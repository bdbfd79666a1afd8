//! The scaler's decision, a pure function of what it observes and what it decided before: how
//! many workers the work needs, which instances to launch, which workers to drain and which
//! instances to terminate. No I/O: the loop (`scaler.rs`) observes and acts; the simulation test
//! drives this with a recorded trace.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use nightshift_proto::wire::WorkerView;
use nightshift_proto::{FleetView, JobDemand};

use crate::provider::Instance;

/// The knobs of the decision (the `nightshift scaler` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min_workers: u32,
    pub max_workers: u32,
    /// Scale-down acts on the largest desired count of this window (scale-up at once).
    pub stabilization: Duration,
    /// With no deadline, pending rows should be done within this long.
    pub target_drain: Duration,
    /// From launch to a worker's first claim: a booting instance counts as capacity this long
    /// (plus `lost_after`), and deadlines are met this much earlier.
    pub boot_time: Duration,
    /// A worker's rows/s before any worker has measured one.
    pub default_rows_per_s: f64,
    /// Idle workers kept around each scheduled run: from `warm_ahead` before it until
    /// `warm_hold` after it.
    pub warm_pool: u32,
    pub warm_ahead: Duration,
    pub warm_hold: Duration,
    /// A worker not seen this long (and holding no lease) is gone: its instance is terminated
    /// and replaced.
    pub lost_after: Duration,
    /// After instances never started a worker (a broken launch template, a worker that cannot
    /// reach the coordinator), launches are held back this long, doubling with each further
    /// round of such instances up to `launch_backoff_max`; after a hold, one instance is tried
    /// at a time until a worker starts on one. Zero: instances are replaced at once.
    pub launch_backoff: Duration,
    pub launch_backoff_max: Duration,
}

/// Why the desired count is what it is (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Pending rows at the measured rate, to be done within `target_drain`.
    Backlog,
    /// A job's deadline needs more than the backlog rule.
    Deadline,
    /// A scheduled run is near: the warm pool.
    WarmPool,
    /// `min_workers`.
    Minimum,
    /// The work wants more than `max_workers`.
    Maximum,
    /// Scale-down waits: a larger count was desired within the stabilisation window.
    Stabilizing,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Backlog => "backlog",
            Reason::Deadline => "deadline",
            Reason::WarmPool => "warm_pool",
            Reason::Minimum => "minimum",
            Reason::Maximum => "maximum",
            Reason::Stabilizing => "stabilizing",
        }
    }
}

/// Why an instance is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Removal {
    /// Its worker drained at the scaler's request and holds no lease.
    Drained,
    /// Its worker vanished (not seen for `lost_after`, no lease), e.g. after a spot notice.
    Lost,
    /// It never registered a worker within `boot_time + lost_after` of its launch.
    NeverStarted,
    /// Booting and not needed any more (no worker yet, so no lease).
    Unneeded,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Drained => "drained",
            Removal::Lost => "lost",
            Removal::NeverStarted => "never_started",
            Removal::Unneeded => "unneeded",
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Workers the work needs, after min/max and stabilisation.
    pub desired: u32,
    /// Capacity counted: instances booting or serving, not draining, not lost.
    pub current: u32,
    pub reason: Option<Reason>,
    /// Instances to launch now.
    pub launch: u32,
    /// Instances the work wants that are not launched: launches are held back after instances
    /// that never started a worker (`Policy::launch_backoff`).
    pub held: u32,
    /// Workers (ids) to ask to drain.
    pub drain: Vec<String>,
    /// Instances to terminate, with why.
    pub terminate: Vec<(String, Removal)>,
}

/// What the scaler sees at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The coordinator's view: jobs' pending rows and deadlines, workers (with the instance
    /// each runs on, its rows/s, leases and whether it drains), scheduled runs.
    pub fleet: FleetView,
    /// The provider's live instances of this fleet.
    pub instances: Vec<Instance>,
}

/// The decision function and the little it remembers between calls.
#[derive(Debug, Clone)]
pub struct Scaler {
    policy: Policy,
    /// (time, desired before stabilisation) within the stabilisation window.
    history: VecDeque<(i64, u32)>,
    /// Workers asked to drain (they may not show `draining` yet).
    draining: std::collections::BTreeSet<String>,
    /// The warm pool is held until this time (ms), from the scheduled runs seen.
    warm_until_ms: i64,
    /// Launches held back since instances never started a worker.
    launch_hold: Option<LaunchHold>,
}

/// Launches held back: rounds of instances that never started a worker since one last did.
#[derive(Debug, Clone, Copy)]
struct LaunchHold {
    rounds: u32,
    /// When the last round was seen: an instance launched since then belongs to the next.
    since_ms: i64,
    /// No launch before this time.
    until_ms: i64,
}

/// Milliseconds per second: `now_ms` clocks against rates in rows per second.
const MS_PER_S: f64 = 1000.0;
/// The least time a job's rows are planned over (s): a deadline already passed, or too near to
/// boot an instance for, asks for all the workers the job's shards can use rather than dividing
/// by zero or a negative time.
const MIN_TIME_LEFT_S: f64 = 1.0;
/// Slots of a worker that does not report them (one shard at a time), and of an empty fleet.
const DEFAULT_SLOTS: u32 = 1;

/// What the scaler makes of one listed instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Launched, no worker seen yet, still within `boot_time + lost_after`: counted.
    Booting,
    /// Its worker claims and is not draining: counted, and a candidate for scale-down.
    Serving,
    /// Draining or lost, but its worker may still hold leases or has not acknowledged the
    /// drain: neither counted nor terminated yet.
    Waiting,
    /// Terminate now (no worker of it holds a lease).
    Remove(Removal),
}

/// A listed instance with its worker and state.
#[derive(Debug)]
struct Member<'a> {
    instance: &'a Instance,
    /// Its worker: the one seen last when a restart left more than one on the instance.
    worker: Option<&'a WorkerView>,
    /// Leases held by all of the instance's workers: a stale one may still hold some.
    leases: usize,
    state: State,
}

impl Member<'_> {
    fn counted(&self) -> bool {
        matches!(self.state, State::Booting | State::Serving)
    }
}

/// A job's share of the fleet: workers, and whether its deadline asked for more than its
/// backlog did.
struct Need {
    workers: u32,
    deadline_raised: bool,
}

impl Scaler {
    /// A scaler that remembers nothing yet: no window, no drain asked, no warm pool held.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            history: VecDeque::new(),
            draining: BTreeSet::new(),
            warm_until_ms: i64::MIN,
            launch_hold: None,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides what to do at `obs.fleet.now_ms`: the desired count from the work, the warm
    /// pool, min/max and the stabilisation window; instances to launch up to it; surplus workers
    /// to drain; and instances to terminate, none of whose workers holds a lease.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        let now = obs.fleet.now_ms;
        self.forget_gone(obs);
        let members = self.classify(obs);
        let (work, reason) = self.work(&obs.fleet);
        let (raw, reason) = self.warm(now, &obs.fleet.scheduled_runs_ms, work, reason);
        let (clamped, reason) = self.clamp(raw, reason);
        let desired = self.stabilize(now, clamped);
        let reason = if desired > clamped {
            Reason::Stabilizing
        } else {
            reason
        };
        let current = to_u32(members.iter().filter(|m| m.counted()).count());
        // Tops up to what the work needs now, not to a count the window still holds: a worker
        // lost while a larger count is held is replaced only if it is still needed, so that
        // nothing launched is drained again within the window.
        let wanted = clamped.saturating_sub(current);
        let launch = self.launches_allowed(now, &members, wanted);
        let mut decision = Decision {
            desired,
            current,
            reason: Some(reason),
            launch,
            held: wanted - launch,
            drain: self.drains_to_repeat(now, &members),
            terminate: members
                .iter()
                .filter_map(|m| match m.state {
                    State::Remove(why) => Some((m.instance.id.clone(), why)),
                    _ => None,
                })
                .collect(),
        };
        if current > desired {
            self.remove_surplus(&members, current - desired, &mut decision);
        }
        decision
    }

    /// Forgets the drains asked of workers whose instance is no longer listed.
    fn forget_gone(&mut self, obs: &Observation) {
        let listed: BTreeSet<&str> = obs.instances.iter().map(|i| i.id.as_str()).collect();
        let kept: BTreeSet<&str> = obs
            .fleet
            .workers
            .iter()
            .filter(|w| instance_of(w).is_some_and(|id| listed.contains(id)))
            .map(|w| w.id.as_str())
            .collect();
        self.draining.retain(|id| kept.contains(id.as_str()));
    }

    /// Each listed instance with its workers (matched by the instance id they report) and
    /// its state. Workers of no listed instance are left out.
    fn classify<'a>(&self, obs: &'a Observation) -> Vec<Member<'a>> {
        let mut by_instance: HashMap<&str, Vec<&WorkerView>> = HashMap::new();
        for w in &obs.fleet.workers {
            if let Some(id) = instance_of(w) {
                by_instance.entry(id).or_default().push(w);
            }
        }
        obs.instances
            .iter()
            .map(|instance| {
                let workers = by_instance.get(instance.id.as_str());
                let workers = workers.map_or(&[][..], Vec::as_slice);
                let worker = workers.iter().copied().max_by_key(|w| w.last_seen_ms);
                let leases = workers.iter().map(|w| w.leases.len()).sum();
                let state = self.state_of(obs.fleet.now_ms, instance, worker, leases);
                Member {
                    instance,
                    worker,
                    leases,
                    state,
                }
            })
            .collect()
    }

    /// An instance's state. An instance is removed only when none of its workers holds a
    /// lease; a drained one only once the coordinator shows that it told the worker (so the
    /// worker takes no new shard between this observation and the termination, and has stopped
    /// on its own).
    fn state_of(
        &self,
        now: i64,
        instance: &Instance,
        worker: Option<&WorkerView>,
        leases: usize,
    ) -> State {
        let lost_after = ms(self.policy.lost_after);
        let Some(w) = worker else {
            let age = now.saturating_sub(instance.launched_ms);
            return if age <= ms(self.policy.boot_time).saturating_add(lost_after) {
                State::Booting
            } else {
                State::Remove(Removal::NeverStarted)
            };
        };
        let stale = now.saturating_sub(w.last_seen_ms) > lost_after;
        let asked = w.draining || self.draining.contains(&w.id);
        if leases > 0 {
            if asked || stale {
                State::Waiting
            } else {
                State::Serving
            }
        } else if w.draining && (w.drain_told || stale) {
            // Told to drain, holding nothing: it is exiting, or gone.
            State::Remove(Removal::Drained)
        } else if stale {
            State::Remove(Removal::Lost)
        } else if asked {
            State::Waiting
        } else {
            State::Serving
        }
    }

    /// Workers asked to drain that still claim and whose drain the coordinator does not show
    /// (the request was lost): asked again, or they would serve uncounted for ever.
    fn drains_to_repeat(&self, now: i64, members: &[Member]) -> Vec<String> {
        let lost_after = ms(self.policy.lost_after);
        members
            .iter()
            .filter_map(|m| m.worker)
            .filter(|w| {
                self.draining.contains(&w.id)
                    && !w.draining
                    && now.saturating_sub(w.last_seen_ms) <= lost_after
            })
            .map(|w| w.id.clone())
            .collect()
    }

    /// Of `wanted` launches, those allowed now. A round of instances that never started a worker
    /// (any launched since the last round) holds launches back for `launch_backoff`, doubled for
    /// each round before it, at most `launch_backoff_max`; after the hold one instance is tried
    /// at a time, while none boots. A worker on an instance launched since the last round ends
    /// the hold.
    fn launches_allowed(&mut self, now: i64, members: &[Member], wanted: u32) -> u32 {
        if self.policy.launch_backoff.is_zero() {
            return wanted;
        }
        let since = self.launch_hold.map_or(i64::MIN, |h| h.since_ms);
        let new = |m: &&Member| m.instance.launched_ms >= since;
        let never = State::Remove(Removal::NeverStarted);
        if members.iter().filter(new).any(|m| m.state == never) {
            let rounds = self.launch_hold.map_or(0, |h| h.rounds).saturating_add(1);
            let doubled = 1u32.checked_shl(rounds - 1).unwrap_or(u32::MAX);
            let hold = (self.policy.launch_backoff.saturating_mul(doubled))
                .min(self.policy.launch_backoff_max);
            self.launch_hold = Some(LaunchHold {
                rounds,
                since_ms: now,
                until_ms: now.saturating_add(ms(hold)),
            });
        } else if self.launch_hold.is_some()
            && members.iter().filter(new).any(|m| m.worker.is_some())
        {
            self.launch_hold = None;
        }
        match self.launch_hold {
            None => wanted,
            Some(h) if now < h.until_ms || members.iter().any(|m| m.state == State::Booting) => 0,
            Some(_) => wanted.min(1),
        }
    }

    /// Workers the jobs need: each job's pending rows at the measured per-worker rate, within
    /// its deadline or `target_drain`, summed; `Deadline` when a deadline asked for more.
    fn work(&self, fleet: &FleetView) -> (u32, Reason) {
        let rate = per_worker_rate(&fleet.workers, self.policy.default_rows_per_s);
        let slots = slots_per_worker(&fleet.workers);
        let mut total = 0u32;
        let mut reason = Reason::Backlog;
        for job in &fleet.jobs {
            let need = self.job_need(job, fleet.now_ms, rate, slots);
            total = total.saturating_add(need.workers);
            if need.deadline_raised {
                reason = Reason::Deadline;
            }
        }
        (total, reason)
    }

    /// One job's workers: enough for its rows within `target_drain`, or within its deadline
    /// less `boot_time` when that asks for more; at least one while rows are pending, and no
    /// more than its open shards can keep busy.
    fn job_need(&self, job: &JobDemand, now: i64, rate: f64, slots: u32) -> Need {
        if job.rows_pending == 0 {
            return Need {
                workers: 0,
                deadline_raised: false,
            };
        }
        let rows = job.rows_pending as f64;
        let cap = to_u32(job.shards_open.div_ceil(u64::from(slots)));
        let workers_for = |seconds: f64| {
            // `as` saturates: a zero rate asks for every worker the shards can use.
            let n = (rows / seconds.max(MIN_TIME_LEFT_S) / rate).ceil() as u32;
            n.max(1).min(cap)
        };
        let backlog = workers_for(self.policy.target_drain.as_secs_f64());
        let by_deadline = job.deadline_ms.map_or(0, |deadline| {
            let left_ms = deadline
                .saturating_sub(now)
                .saturating_sub(ms(self.policy.boot_time));
            workers_for(left_ms as f64 / MS_PER_S)
        });
        Need {
            workers: backlog.max(by_deadline),
            deadline_raised: by_deadline > backlog,
        }
    }

    /// The warm pool: from `warm_ahead` before each scheduled run to `warm_hold` after it, at
    /// least `warm_pool` workers. The hold is remembered because once a run fires the schedule
    /// lists its next run instead.
    fn warm(&mut self, now: i64, runs: &[i64], work: u32, reason: Reason) -> (u32, Reason) {
        let ahead = ms(self.policy.warm_ahead);
        for &run in runs {
            if now >= run.saturating_sub(ahead) {
                let until = run.saturating_add(ms(self.policy.warm_hold));
                self.warm_until_ms = self.warm_until_ms.max(until);
            }
        }
        let pool = self.policy.warm_pool;
        if now < self.warm_until_ms && pool > work {
            (pool, Reason::WarmPool)
        } else {
            (work, reason)
        }
    }

    /// `raw` within `[min_workers, max_workers]` (the maximum wins a contradictory policy).
    fn clamp(&self, raw: u32, reason: Reason) -> (u32, Reason) {
        let clamped = raw
            .max(self.policy.min_workers)
            .min(self.policy.max_workers);
        let reason = match clamped.cmp(&raw) {
            Ordering::Greater => Reason::Minimum,
            Ordering::Less => Reason::Maximum,
            Ordering::Equal => reason,
        };
        (clamped, reason)
    }

    /// The largest count desired within the stabilisation window, this one included: a larger
    /// count applies at once, a smaller one only once every larger one has left the window, so
    /// that a noisy rate or a job finishing between two others does not buy and drop workers.
    fn stabilize(&mut self, now: i64, clamped: u32) -> u32 {
        let oldest = now.saturating_sub(ms(self.policy.stabilization));
        self.history.push_back((now, clamped));
        // A clock stepping back keeps the later entries: the safe error holds capacity.
        self.history.retain(|&(at, _)| at >= oldest);
        self.history
            .iter()
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(clamped)
    }

    /// Removes `surplus` counted workers: idle workers drain first (newest instance first),
    /// then booting instances are terminated (newest first), then the busy workers with the
    /// fewest leases (and rows left) drain. A worker already draining is not counted, so it is
    /// never picked twice.
    fn remove_surplus(&mut self, members: &[Member], surplus: u32, decision: &mut Decision) {
        let mut picks: Vec<_> = members
            .iter()
            .filter(|m| m.counted())
            .map(|m| {
                let class = match (m.state, m.leases) {
                    (State::Serving, 0) => 0,
                    (State::Booting, _) => 1,
                    _ => 2,
                };
                let rows_left = m.worker.map_or(0, rows_left);
                let key = (class, m.leases, rows_left, Reverse(m.instance.launched_ms));
                (key, m)
            })
            .collect();
        picks.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.instance.id.cmp(&b.1.instance.id))
        });
        for (_, m) in picks.into_iter().take(surplus as usize) {
            match (m.state, m.worker) {
                (State::Serving, Some(w)) => {
                    decision.drain.push(w.id.clone());
                    self.draining.insert(w.id.clone());
                }
                _ => decision
                    .terminate
                    .push((m.instance.id.clone(), Removal::Unneeded)),
            }
        }
    }
}

/// The instance a worker says it runs on.
fn instance_of(w: &WorkerView) -> Option<&str> {
    w.instance.as_ref().map(|i| i.id.as_str())
}

/// Rows its leases still have to do.
fn rows_left(w: &WorkerView) -> u64 {
    w.leases
        .iter()
        .map(|l| l.rows.saturating_sub(l.rows_done))
        .sum()
}

/// A worker's rows/s: the median over workers that hold leases and measured a rate (any
/// worker the coordinator lists, on a listed instance or not), else the policy's default.
fn per_worker_rate(workers: &[WorkerView], default: f64) -> f64 {
    let mut rates: Vec<f64> = workers
        .iter()
        .filter(|w| !w.leases.is_empty() && w.rows_per_s.is_finite() && w.rows_per_s > 0.0)
        .map(|w| w.rows_per_s)
        .collect();
    if rates.is_empty() {
        return default;
    }
    rates.sort_by(f64::total_cmp);
    let mid = rates.len() / 2;
    if rates.len().is_multiple_of(2) {
        (rates[mid - 1] + rates[mid]) / 2.0
    } else {
        rates[mid]
    }
}

/// A worker's slots: the lower median of the slots workers report (an unreported or zero
/// count is one). The lower one, so that the cap by open shards never turns away a worker that
/// would have had a shard.
fn slots_per_worker(workers: &[WorkerView]) -> u32 {
    let mut slots: Vec<u32> = workers
        .iter()
        .map(|w| w.slots.unwrap_or(DEFAULT_SLOTS).max(DEFAULT_SLOTS))
        .collect();
    slots.sort_unstable();
    slots
        .get(slots.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(DEFAULT_SLOTS)
}

/// A duration in ms, the unit of `now_ms` (one too long for i64 is for ever).
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A count as the decision's u32 (saturating: no fleet is that large).
fn to_u32<T: TryInto<u32>>(n: T) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use nightshift_proto::wire::WorkerLease;
    use nightshift_proto::{CapacityType, InstanceInfo};

    use super::*;
    use crate::provider::InstanceState;

    const T0: i64 = 1_700_000_000_000;
    const SECOND: i64 = 1000;
    const MINUTE: i64 = 60 * SECOND;
    /// Rows one worker does within `target_drain` at the default rate (100 rows/s, 600 s).
    const ROWS_PER_WORKER: u64 = 60_000;

    fn policy() -> Policy {
        Policy {
            min_workers: 0,
            max_workers: 20,
            stabilization: Duration::from_secs(300),
            target_drain: Duration::from_secs(600),
            boot_time: Duration::from_secs(120),
            default_rows_per_s: 100.0,
            warm_pool: 0,
            warm_ahead: Duration::from_secs(600),
            warm_hold: Duration::from_secs(300),
            lost_after: Duration::from_secs(60),
            launch_backoff: Duration::from_secs(300),
            launch_backoff_max: Duration::from_secs(1200),
        }
    }

    fn instance(n: u32, launched_ms: i64) -> Instance {
        Instance {
            id: format!("i-{n}"),
            instance_type: "g5.xlarge".into(),
            capacity_type: CapacityType::Spot,
            state: InstanceState::Running,
            launched_ms,
        }
    }

    /// Worker `w-n` on instance `i-n`, last seen at `seen`, holding `leases` shards of 1000
    /// rows (none done) and measuring 100 rows/s while it holds any.
    fn worker(n: u32, seen: i64, leases: usize) -> WorkerView {
        WorkerView {
            id: format!("w-{n}"),
            last_seen_ms: seen,
            slots: None,
            rows_per_s: if leases > 0 { 100.0 } else { 0.0 },
            leases: (0..leases)
                .map(|s| WorkerLease {
                    job_id: 1,
                    shard_id: i64::from(n) * 100 + s as i64,
                    rows: 1000,
                    rows_done: 0,
                })
                .collect(),
            gpus: Vec::new(),
            instance: Some(InstanceInfo {
                id: format!("i-{n}"),
                instance_type: "g5.xlarge".into(),
                capacity_type: CapacityType::Spot,
            }),
            draining: false,
            drain_told: false,
        }
    }

    fn job(rows_pending: u64, shards_open: u64) -> JobDemand {
        JobDemand {
            job_id: 1,
            rows_pending,
            shards_open,
            deadline_ms: None,
        }
    }

    fn obs(
        now: i64,
        jobs: Vec<JobDemand>,
        workers: Vec<WorkerView>,
        instances: Vec<Instance>,
    ) -> Observation {
        Observation {
            fleet: FleetView {
                now_ms: now,
                jobs,
                workers,
                scheduled_runs_ms: Vec::new(),
            },
            instances,
        }
    }

    /// `n` instances launched 10 minutes before `now`, each with a worker seen at `now`
    /// holding one lease.
    fn busy_fleet(n: u32, now: i64) -> (Vec<WorkerView>, Vec<Instance>) {
        let workers = (1..=n).map(|k| worker(k, now, 1)).collect();
        let instances = (1..=n).map(|k| instance(k, now - 10 * MINUTE)).collect();
        (workers, instances)
    }

    /// Decides and checks the invariant: no instance terminated while a worker on it holds a
    /// lease, no worker asked to drain twice in one decision.
    fn decide(scaler: &mut Scaler, obs: &Observation) -> Decision {
        let d = scaler.decide(obs);
        for (id, why) in &d.terminate {
            let busy = obs
                .fleet
                .workers
                .iter()
                .filter(|w| instance_of(w) == Some(id.as_str()))
                .any(|w| !w.leases.is_empty());
            assert!(
                !busy,
                "terminated {id} ({why:?}) while its worker holds a lease"
            );
        }
        let asked: BTreeSet<&String> = d.drain.iter().collect();
        assert_eq!(asked.len(), d.drain.len(), "a worker asked twice: {d:?}");
        d
    }

    fn terminated(d: &Decision) -> Vec<(&str, Removal)> {
        d.terminate
            .iter()
            .map(|(id, r)| (id.as_str(), *r))
            .collect()
    }

    #[test]
    fn scales_up_at_once() {
        let mut s = Scaler::new(policy());
        let d = decide(
            &mut s,
            &obs(T0, vec![job(5 * ROWS_PER_WORKER, 100)], vec![], vec![]),
        );
        assert_eq!((d.desired, d.current, d.launch), (5, 0, 5));
        assert_eq!(d.reason, Some(Reason::Backlog));

        let (workers, instances) = busy_fleet(5, T0 + MINUTE);
        let more = job(8 * ROWS_PER_WORKER, 100);
        let d = decide(&mut s, &obs(T0 + MINUTE, vec![more], workers, instances));
        assert_eq!((d.desired, d.current, d.launch), (8, 5, 3));
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let mut s = Scaler::new(policy());
        let (workers, instances) = busy_fleet(5, T0);
        let big = job(5 * ROWS_PER_WORKER, 100);
        let d = decide(&mut s, &obs(T0, vec![big], workers, instances.clone()));
        assert_eq!((d.desired, d.launch), (5, 0));

        let small = job(ROWS_PER_WORKER, 100);
        for at in [T0 + MINUTE, T0 + 5 * MINUTE] {
            let (workers, _) = busy_fleet(5, at);
            let d = decide(
                &mut s,
                &obs(at, vec![small.clone()], workers, instances.clone()),
            );
            assert_eq!(d.desired, 5, "at {at}");
            assert_eq!(d.reason, Some(Reason::Stabilizing));
            assert!(d.drain.is_empty() && d.terminate.is_empty(), "{d:?}");
        }

        let at = T0 + 5 * MINUTE + SECOND;
        let (workers, _) = busy_fleet(5, at);
        let d = decide(&mut s, &obs(at, vec![small], workers, instances));
        assert_eq!((d.desired, d.current), (1, 5));
        assert_eq!(d.drain.len(), 4, "{d:?}");
        assert!(
            d.terminate.is_empty(),
            "busy workers drain, never terminate: {d:?}"
        );
    }

    #[test]
    fn lost_worker_is_replaced_and_terminated() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(2, T0);
        workers[0].last_seen_ms = T0 - 61 * SECOND;
        workers[0].leases.clear();
        let work = job(2 * ROWS_PER_WORKER, 100);
        let d = decide(&mut s, &obs(T0, vec![work], workers, instances));
        assert_eq!((d.desired, d.current, d.launch), (2, 1, 1));
        assert_eq!(terminated(&d), [("i-1", Removal::Lost)]);
    }

    #[test]
    fn lost_worker_holding_leases_waits_for_them() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(2, T0);
        workers[0].last_seen_ms = T0 - 5 * MINUTE;
        let work = job(2 * ROWS_PER_WORKER, 100);
        let d = decide(
            &mut s,
            &obs(T0, vec![work.clone()], workers.clone(), instances.clone()),
        );
        assert_eq!((d.current, d.launch), (1, 1), "not counted, so replaced");
        assert!(d.terminate.is_empty(), "{d:?}");

        workers[0].leases.clear();
        let d = decide(&mut s, &obs(T0 + SECOND, vec![work], workers, instances));
        assert_eq!(terminated(&d), [("i-1", Removal::Lost)]);
    }

    #[test]
    fn busy_worker_is_never_terminated() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(3, T0);
        workers[0].draining = true;
        workers[0].drain_told = true;
        let d = decide(&mut s, &obs(T0, vec![], workers.clone(), instances.clone()));
        assert!(d.terminate.is_empty(), "{d:?}");
        assert_eq!(d.current, 2, "a draining worker is not capacity");
        assert_eq!(d.desired, 0);
        assert_eq!(d.drain.len(), 2, "the other two drain: {d:?}");

        // The coordinator shows the drains asked; the first worker has finished its shard.
        workers[0].leases.clear();
        workers[1].draining = true;
        workers[1].drain_told = true;
        workers[2].draining = true;
        workers[2].drain_told = true;
        let d = decide(&mut s, &obs(T0 + SECOND, vec![], workers, instances));
        assert_eq!(terminated(&d), [("i-1", Removal::Drained)]);
        assert!(d.drain.is_empty(), "not asked twice: {d:?}");
    }

    #[test]
    fn a_drained_worker_goes_only_once_it_was_told() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(1, T0);
        workers[0].leases.clear();
        workers[0].draining = true;
        let d = decide(&mut s, &obs(T0, vec![], workers.clone(), instances.clone()));
        assert!(
            d.terminate.is_empty(),
            "not told yet, it may still claim: {d:?}"
        );
        workers[0].drain_told = true;
        let d = decide(&mut s, &obs(T0 + SECOND, vec![], workers, instances));
        assert_eq!(terminated(&d), [("i-1", Removal::Drained)]);
    }

    #[test]
    fn booting_instance_is_counted_then_given_up() {
        let mut s = Scaler::new(policy());
        let work = || vec![job(ROWS_PER_WORKER, 10)];
        let booting = vec![instance(1, T0)];
        let d = decide(&mut s, &obs(T0 + MINUTE, work(), vec![], booting.clone()));
        assert_eq!((d.current, d.launch), (1, 0));
        assert!(d.terminate.is_empty());

        // boot_time + lost_after = 180 s after its launch, it still counts; after, it is gone.
        let d = decide(
            &mut s,
            &obs(T0 + 3 * MINUTE, work(), vec![], booting.clone()),
        );
        assert_eq!((d.current, d.launch), (1, 0));
        let d = decide(&mut s, &obs(T0 + 3 * MINUTE + 1, work(), vec![], booting));
        assert_eq!(
            (d.current, d.launch, d.held),
            (0, 0, 1),
            "launches back off"
        );
        assert_eq!(terminated(&d), [("i-1", Removal::NeverStarted)]);
    }

    #[test]
    fn instances_that_never_start_hold_launches_back_doubling_until_a_worker_starts() {
        let mut s = Scaler::new(policy());
        let work = || vec![job(3 * ROWS_PER_WORKER, 100)];
        let d = decide(&mut s, &obs(T0, work(), vec![], vec![]));
        assert_eq!(d.launch, 3);
        // All three never start: terminated, and nothing replaces them for 5 minutes.
        let batch: Vec<Instance> = (1..=3).map(|n| instance(n, T0)).collect();
        let t1 = T0 + 3 * MINUTE + 1;
        let d = decide(&mut s, &obs(t1, work(), vec![], batch.clone()));
        assert_eq!((d.launch, d.held, d.terminate.len()), (0, 3, 3), "{d:?}");
        // Still listed while they shut down: the same round, not a new one.
        let d = decide(&mut s, &obs(t1 + 5 * MINUTE - 1, work(), vec![], batch));
        assert_eq!((d.launch, d.held), (0, 3));
        // After the hold, one instance is tried, and none more while it boots.
        let d = decide(&mut s, &obs(t1 + 5 * MINUTE, work(), vec![], vec![]));
        assert_eq!((d.launch, d.held), (1, 2));
        let probe = vec![instance(4, t1 + 5 * MINUTE)];
        let d = decide(&mut s, &obs(t1 + 6 * MINUTE, work(), vec![], probe.clone()));
        assert_eq!((d.current, d.launch, d.held), (1, 0, 2));
        // It never starts either: the hold doubles.
        let t2 = t1 + 8 * MINUTE + 1;
        let d = decide(&mut s, &obs(t2, work(), vec![], probe));
        assert_eq!(terminated(&d), [("i-4", Removal::NeverStarted)]);
        assert_eq!(d.launch, 0);
        let d = decide(&mut s, &obs(t2 + 10 * MINUTE - 1, work(), vec![], vec![]));
        assert_eq!(d.launch, 0, "held for 10 minutes");
        let d = decide(&mut s, &obs(t2 + 10 * MINUTE, work(), vec![], vec![]));
        assert_eq!(d.launch, 1);
        // This one's worker starts: the hold ends and the rest launch at once.
        let t3 = t2 + 12 * MINUTE;
        let started = worker(5, t3, 1);
        let d = decide(
            &mut s,
            &obs(
                t3,
                work(),
                vec![started],
                vec![instance(5, t2 + 10 * MINUTE)],
            ),
        );
        assert_eq!((d.current, d.launch, d.held), (1, 2, 0), "{d:?}");
    }

    #[test]
    fn the_launch_hold_stops_doubling_at_its_maximum_and_zero_turns_it_off() {
        let mut s = Scaler::new(policy());
        let work = || vec![job(ROWS_PER_WORKER, 100)];
        let mut now = T0;
        // Rounds 1 to 4 hold 5, 10, 20 (the maximum) and 20 minutes.
        for (n, hold) in [(1, 5), (2, 10), (3, 20), (4, 20)] {
            let failed = vec![instance(n, now)];
            now += 3 * MINUTE + 1;
            let d = decide(&mut s, &obs(now, work(), vec![], failed));
            assert_eq!(d.launch, 0, "round {n}");
            let d = decide(
                &mut s,
                &obs(now + hold * MINUTE - 1, work(), vec![], vec![]),
            );
            assert_eq!(d.launch, 0, "round {n}");
            now += hold * MINUTE;
            let d = decide(&mut s, &obs(now, work(), vec![], vec![]));
            assert_eq!(d.launch, 1, "round {n}: held {hold} minutes");
        }
        let mut s = Scaler::new(Policy {
            launch_backoff: Duration::ZERO,
            ..policy()
        });
        let failed = vec![instance(1, T0)];
        let d = decide(&mut s, &obs(T0 + 3 * MINUTE + 1, work(), vec![], failed));
        assert_eq!((d.launch, d.held), (1, 0), "replaced at once");
    }

    #[test]
    fn deadline_raises_desired() {
        let mut s = Scaler::new(Policy {
            target_drain: Duration::from_secs(3600),
            ..policy()
        });
        let rows = 600_000;
        let d = decide(&mut s, &obs(T0, vec![job(rows, 100)], vec![], vec![]));
        assert_eq!((d.desired, d.reason), (2, Some(Reason::Backlog)));

        // 720 s to the deadline, less the 120 s boot: 600 s at 100 rows/s a worker.
        let due = JobDemand {
            deadline_ms: Some(T0 + 720 * SECOND),
            ..job(rows, 100)
        };
        let mut s = Scaler::new(s.policy().clone());
        let d = decide(&mut s, &obs(T0, vec![due.clone()], vec![], vec![]));
        assert_eq!((d.desired, d.reason), (10, Some(Reason::Deadline)));

        // A far deadline never asks for less than the backlog rule.
        let far = JobDemand {
            deadline_ms: Some(T0 + 24 * 3600 * SECOND),
            ..due.clone()
        };
        let mut s = Scaler::new(s.policy().clone());
        let d = decide(&mut s, &obs(T0, vec![far], vec![], vec![]));
        assert_eq!((d.desired, d.reason), (2, Some(Reason::Backlog)));

        // A deadline already passed asks for every worker the open shards can use.
        let late = JobDemand {
            deadline_ms: Some(T0 - MINUTE),
            shards_open: 15,
            ..due
        };
        let mut s = Scaler::new(s.policy().clone());
        let d = decide(&mut s, &obs(T0, vec![late], vec![], vec![]));
        assert_eq!((d.desired, d.reason), (15, Some(Reason::Deadline)));
    }

    #[test]
    fn open_shards_cap_a_jobs_workers() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(1, T0);
        workers[0].slots = Some(2);
        let jobs = vec![job(100 * ROWS_PER_WORKER, 3), job(100 * ROWS_PER_WORKER, 0)];
        let d = decide(&mut s, &obs(T0, jobs, workers, instances));
        assert_eq!(
            d.desired, 2,
            "3 shards at 2 slots a worker; none open, none"
        );

        let mut s = Scaler::new(policy());
        let d = decide(&mut s, &obs(T0, vec![job(1, 1)], vec![], vec![]));
        assert_eq!(d.desired, 1, "one row pending still wants a worker");
    }

    #[test]
    fn rate_is_the_median_of_busy_workers_anywhere() {
        let mut s = Scaler::new(policy());
        let (mut workers, instances) = busy_fleet(2, T0);
        workers[0].rows_per_s = 200.0;
        workers[1].rows_per_s = 10_000.0;
        // On no listed instance: informs the rate, never counted nor touched.
        let mut stranger = worker(9, T0, 1);
        stranger.rows_per_s = 300.0;
        let mut idle = worker(8, T0, 0);
        idle.rows_per_s = 1.0;
        workers.extend([stranger, idle]);
        // Median of 200, 300, 10000 is 300 rows/s: 3 workers for 3 * 300 * 600 rows.
        let d = decide(
            &mut s,
            &obs(T0, vec![job(540_000, 100)], workers, instances),
        );
        assert_eq!((d.desired, d.current, d.launch), (3, 2, 1));
        assert!(d.drain.is_empty() && d.terminate.is_empty());
    }

    #[test]
    fn warm_pool_around_a_scheduled_run() {
        let mut s = Scaler::new(Policy {
            warm_pool: 3,
            stabilization: Duration::ZERO,
            ..policy()
        });
        let run = T0 + 30 * MINUTE;
        let at = |now: i64, runs: Vec<i64>, jobs: Vec<JobDemand>| Observation {
            fleet: FleetView {
                now_ms: now,
                jobs,
                workers: vec![],
                scheduled_runs_ms: runs,
            },
            instances: vec![],
        };
        let d = decide(&mut s, &at(run - 11 * MINUTE, vec![run], vec![]));
        assert_eq!(d.desired, 0, "too early");
        let d = decide(&mut s, &at(run - 10 * MINUTE, vec![run], vec![]));
        assert_eq!((d.desired, d.reason), (3, Some(Reason::WarmPool)));
        // The run fired: the schedule lists tomorrow's, the pool is held `warm_hold`.
        let tomorrow = run + 24 * 60 * MINUTE;
        let d = decide(&mut s, &at(run + MINUTE, vec![tomorrow], vec![]));
        assert_eq!((d.desired, d.reason), (3, Some(Reason::WarmPool)));
        let big = vec![job(5 * ROWS_PER_WORKER, 100)];
        let d = decide(&mut s, &at(run + 2 * MINUTE, vec![tomorrow], big));
        assert_eq!((d.desired, d.reason), (5, Some(Reason::Backlog)));
        let d = decide(&mut s, &at(run + 5 * MINUTE, vec![tomorrow], vec![]));
        assert_eq!(d.desired, 0, "the hold is over");
    }

    #[test]
    fn min_and_max_clamp() {
        let mut s = Scaler::new(Policy {
            min_workers: 2,
            max_workers: 4,
            ..policy()
        });
        let d = decide(&mut s, &obs(T0, vec![], vec![], vec![]));
        assert_eq!(
            (d.desired, d.launch, d.reason),
            (2, 2, Some(Reason::Minimum))
        );
        let d = decide(
            &mut s,
            &obs(T0, vec![job(50 * ROWS_PER_WORKER, 100)], vec![], vec![]),
        );
        assert_eq!((d.desired, d.reason), (4, Some(Reason::Maximum)));

        let mut s = Scaler::new(policy());
        let d = decide(&mut s, &obs(T0, vec![], vec![], vec![]));
        assert_eq!(
            (d.desired, d.launch, d.reason),
            (0, 0, Some(Reason::Backlog))
        );
    }

    #[test]
    fn drain_victims_prefer_idle_workers() {
        let mut s = Scaler::new(Policy {
            stabilization: Duration::ZERO,
            ..policy()
        });
        let mut workers = vec![
            worker(1, T0, 0),
            worker(2, T0, 1),
            worker(3, T0, 3),
            worker(4, T0, 2),
        ];
        let mut instances: Vec<_> = (1..=4).map(|n| instance(n, T0 - 10 * MINUTE)).collect();
        instances.push(instance(5, T0 - MINUTE));
        let need = |n: u64| vec![job(n * ROWS_PER_WORKER, 100)];
        let d = decide(
            &mut s,
            &obs(T0, need(2), workers.clone(), instances.clone()),
        );
        assert_eq!((d.desired, d.current), (2, 5));
        assert_eq!(
            d.drain,
            ["w-1", "w-2"],
            "idle first, then the fewest leases"
        );
        assert_eq!(terminated(&d), [("i-5", Removal::Unneeded)]);

        instances.pop();
        workers[0].draining = true;
        workers[0].drain_told = true;
        workers[1].draining = true;
        workers[1].drain_told = true;
        let at = T0 + 15 * SECOND;
        let d = decide(
            &mut s,
            &obs(at, need(2), workers.clone(), instances.clone()),
        );
        assert_eq!((d.desired, d.current, d.launch), (2, 2, 0));
        assert_eq!(
            terminated(&d),
            [("i-1", Removal::Drained)],
            "w-2 holds its lease"
        );
        assert!(d.drain.is_empty(), "{d:?}");

        let d = decide(&mut s, &obs(at + 15 * SECOND, need(1), workers, instances));
        assert_eq!(d.drain, ["w-4"], "2 leases before 3; w-2 not picked twice");
    }

    #[test]
    fn a_drain_the_coordinator_lost_is_asked_again() {
        let mut s = Scaler::new(policy());
        let workers = vec![worker(1, T0, 0)];
        let instances = vec![instance(1, T0 - 10 * MINUTE)];
        let d = decide(&mut s, &obs(T0, vec![], workers.clone(), instances.clone()));
        assert_eq!(d.drain, ["w-1"]);

        // The coordinator does not show the drain: ask again, neither count nor terminate.
        let d = decide(
            &mut s,
            &obs(T0 + SECOND, vec![], workers, instances.clone()),
        );
        assert_eq!((d.current, d.drain.clone()), (0, vec!["w-1".to_string()]));
        assert!(d.terminate.is_empty());

        // Its instance gone, the worker is forgotten.
        decide(&mut s, &obs(T0 + 2 * SECOND, vec![], vec![], vec![]));
        assert!(s.draining.is_empty());
    }

    #[test]
    fn a_lost_worker_is_not_replaced_for_a_count_only_the_window_holds() {
        let mut s = Scaler::new(policy());
        let (workers, instances) = busy_fleet(4, T0);
        decide(
            &mut s,
            &obs(
                T0,
                vec![job(4 * ROWS_PER_WORKER, 100)],
                workers,
                instances.clone(),
            ),
        );

        let at = T0 + 2 * MINUTE;
        let (mut workers, _) = busy_fleet(4, at);
        workers[3].last_seen_ms = at - 2 * MINUTE;
        workers[3].leases.clear();
        let d = decide(
            &mut s,
            &obs(at, vec![job(2 * ROWS_PER_WORKER, 100)], workers, instances),
        );
        assert_eq!((d.desired, d.current, d.launch), (4, 3, 0));
        assert_eq!(d.reason, Some(Reason::Stabilizing));
        assert_eq!(terminated(&d), [("i-4", Removal::Lost)]);
    }
}
