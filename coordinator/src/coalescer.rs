//! Coalescing of concurrent worker requests into store calls for many at once. Hundreds of
//! workers that claim or complete shards at the same moment would each cost the database a
//! statement and a commit (a WAL flush); a coalescer gathers the requests that arrive while
//! earlier calls are in flight and serves each gathered lot with one call (`claim_many`,
//! `complete_many`). An idle coordinator adds no wait: a lone request goes out at once.
//!
//! At most `rounds` calls are in flight; the requests that arrive meanwhile queue, and the
//! next free round takes all of them, up to `weight` (shards, for claims). Each request gets
//! its own answer. When the coordinator shuts down, requests still queued are given back
//! unanswered (`call` returns `None`) and their callers go to the store directly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use nightshift_metastore::{Result, StoreError};

/// A call for a lot of requests: one answer per request, in order; `Err` fails all of them.
pub type Round<Req, Ans> = Arc<
    dyn Fn(Vec<Req>) -> Pin<Box<dyn Future<Output = Result<Vec<Result<Ans>>>> + Send>>
        + Send
        + Sync,
>;

/// How much one round may carry, and how many may be in flight.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rounds: usize,
    pub weight: usize,
}

struct Waiting<Req, Ans> {
    req: Req,
    weight: usize,
    reply: oneshot::Sender<Result<Ans>>,
}

pub struct Coalescer<Req, Ans> {
    queue: mpsc::UnboundedSender<Waiting<Req, Ans>>,
}

impl<Req, Ans> Clone for Coalescer<Req, Ans> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<Req: Clone + Send + 'static, Ans: Send + 'static> Coalescer<Req, Ans> {
    /// Starts gathering on `tasks` (its calls too); it stops at `shutdown`.
    pub fn start(
        limits: Limits,
        round: Round<Req, Ans>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        tasks.spawn(gather(requests, limits, round, shutdown, tasks.clone()));
        Self { queue }
    }

    /// Queues a request of `weight` and waits for its answer; `None` when the coalescer has
    /// stopped and the caller must go to the store itself.
    pub async fn call(&self, req: Req, weight: usize) -> Option<Result<Ans>> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Waiting { req, weight, reply }).ok()?;
        answer.await.ok()
    }
}

async fn gather<Req: Clone + Send + 'static, Ans: Send + 'static>(
    mut requests: mpsc::UnboundedReceiver<Waiting<Req, Ans>>,
    limits: Limits,
    round: Round<Req, Ans>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(limits.rounds.max(1)));
    let mut held_over: Option<Waiting<Req, Ans>> = None;
    loop {
        let first = match held_over.take() {
            Some(w) => w,
            None => tokio::select! {
                _ = shutdown.cancelled() => return,
                w = requests.recv() => match w {
                    Some(w) => w,
                    None => return,
                },
            },
        };
        // Wait for a free round before gathering: what arrives meanwhile joins this lot.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = in_flight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut weight = first.weight;
        let mut lot = vec![first];
        while weight < limits.weight {
            match requests.try_recv() {
                Ok(w) if weight + w.weight <= limits.weight => {
                    weight += w.weight;
                    lot.push(w);
                }
                Ok(w) => {
                    held_over = Some(w);
                    break;
                }
                Err(_) => break,
            }
        }
        let round = round.clone();
        tasks.spawn(async move {
            let (reqs, replies): (Vec<Req>, Vec<_>) =
                lot.into_iter().map(|w| (w.req, w.reply)).unzip();
            for (reply, answer) in replies.into_iter().zip(serve(&round, reqs).await) {
                let _ = reply.send(answer);
            }
            drop(permit);
        });
    }
}

/// One answer per request. When the lot's call fails as a whole, each request is tried alone,
/// so one request the store cannot take fails only itself.
async fn serve<Req: Clone, Ans>(round: &Round<Req, Ans>, reqs: Vec<Req>) -> Vec<Result<Ans>> {
    let wanted = reqs.len();
    let alone = (wanted > 1).then(|| reqs.clone());
    let failure = match round(reqs).await {
        Ok(answers) if answers.len() == wanted => return answers,
        Ok(answers) => {
            StoreError::Corrupt(format!("{} answers for {wanted} requests", answers.len()))
        }
        Err(e) => e,
    };
    let Some(reqs) = alone else {
        return vec![Err(StoreError::Batch(failure.to_string()))];
    };
    tracing::warn!(requests = wanted, error = %failure, "a coalesced call failed; serving its requests one by one");
    let answers = reqs.into_iter().map(|r| async move {
        match round(vec![r]).await {
            Ok(mut answers) if answers.len() == 1 => answers.remove(0),
            Ok(_) => Err(StoreError::Corrupt("no answer for one request".into())),
            Err(e) => Err(StoreError::Batch(e.to_string())),
        }
    });
    futures::future::join_all(answers).await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A round that records the lots it is given, answers each request with its double, and
    /// fails any lot holding 999.
    fn recording(lots: Arc<Mutex<Vec<Vec<u32>>>>) -> Round<u32, u32> {
        Arc::new(move |reqs: Vec<u32>| {
            let lots = lots.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                lots.lock().unwrap().push(reqs.clone());
                if reqs.contains(&999) {
                    return Err(StoreError::Corrupt("thirteen".into()));
                }
                Ok(reqs.into_iter().map(|r| Ok(r * 2)).collect())
            })
        })
    }

    #[tokio::test]
    async fn concurrent_requests_share_rounds_and_each_gets_its_own_answer() {
        let lots = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let limits = Limits {
            rounds: 1,
            weight: 8,
        };
        let c = Coalescer::start(
            limits,
            recording(lots.clone()),
            stop.clone(),
            &TaskTracker::new(),
        );
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.call(i, 1).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer.unwrap().unwrap(), i * 2);
        }
        let lots = lots.lock().unwrap().clone();
        let mut served: Vec<u32> = lots.iter().flatten().copied().collect();
        served.sort();
        assert_eq!(served, (0..20).collect::<Vec<_>>(), "each request once");
        assert!(
            lots.iter().all(|l| l.len() <= 8),
            "a lot over the weight: {lots:?}"
        );
        assert!(lots.len() < 20, "nothing was coalesced: {lots:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_request_that_fails_its_lot_fails_only_itself() {
        let lots = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let limits = Limits {
            rounds: 1,
            weight: 100,
        };
        let c = Coalescer::start(
            limits,
            recording(lots.clone()),
            stop.clone(),
            &TaskTracker::new(),
        );
        let calls: Vec<_> = [1u32, 999, 2, 3, 999, 4]
            .into_iter()
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.call(i, 1).await.unwrap()) })
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                (999, answer) => assert!(answer.is_err()),
                (i, answer) => assert_eq!(answer.unwrap(), i * 2, "request {i}"),
            }
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_failed_round_fails_each_of_its_requests_and_a_stopped_one_answers_none() {
        let lots = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let limits = Limits {
            rounds: 2,
            weight: 100,
        };
        let c = Coalescer::start(limits, recording(lots), stop.clone(), &TaskTracker::new());
        let e = c.call(999, 1).await.unwrap().unwrap_err();
        assert!(
            matches!(e, StoreError::Batch(ref m) if m.contains("thirteen")),
            "{e}"
        );
        assert_eq!(c.call(4, 1).await.unwrap().unwrap(), 8);
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(c.call(5, 1).await.is_none(), "a stopped coalescer answers");
    }
}
