//! The cpu backend's threads: `nthreads - 1` persistent workers plus the calling thread (tid 0) run every kernel of
//! a step together, each calling the kernel with its `tid`, and meet at a barrier after each kernel (and after the
//! zero-fill before a kernel that accumulates). Workers wait for the next step at the same barrier. The barrier spins
//! briefly (a kernel on tiny shapes takes microseconds) and then sleeps on a condition variable, so idle workers and
//! oversubscribed machines (parallel tests) do not burn CPU.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// The host kernel ABI: `void tunec_k<N>(void **args, int32_t tid, int32_t nthreads)`.
pub type HostFn = unsafe extern "C" fn(*const *mut u8, i32, i32);

/// One kernel launch with its argument pointers resolved.
pub struct Launch {
    pub func: HostFn,
    pub args: Vec<*mut u8>,
    /// Byte ranges to zero before the kernel runs (its `zero_host` arguments).
    pub zero: Vec<(*mut u8, usize)>,
}

// SAFETY: the pointers point into allocations the backend owns and keeps alive (and in place) for as long as the
// pool exists; the threads touch them only while a step runs, each kernel writing disjoint elements per `tid` (or
// atomically), separated from the next kernel by the barrier.
unsafe impl Send for Launch {}
// SAFETY: as above.
unsafe impl Sync for Launch {}

/// A reusable barrier for `n` threads: spin, then sleep.
struct Barrier {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    /// Set when the pool could not start all its threads: every wait returns at once.
    broken: AtomicBool,
}

/// Spins before sleeping (each spin is a `spin_loop` hint, a few nanoseconds).
const SPINS: usize = 4000;

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier {
            n,
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    fn wait(&self) {
        if self.n <= 1 || self.broken.load(Ordering::Acquire) {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            // The last to arrive resets the count before opening the barrier: nobody can arrive for the next
            // round before they see the new generation.
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            // Under the lock, so a thread between its check and its wait cannot miss the notification.
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
            return;
        }
        for _ in 0..SPINS {
            if self.generation.load(Ordering::Acquire) != generation || self.broken.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
        }
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.generation.load(Ordering::Acquire) == generation && !self.broken.load(Ordering::Acquire) {
            guard = self.cv.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Shared {
    launches: Vec<Launch>,
    nthreads: usize,
    barrier: Barrier,
    stop: AtomicBool,
    /// The launches the current run covers: `first..end`.
    first: AtomicUsize,
    end: AtomicUsize,
}

impl Shared {
    /// Thread `tid`'s part of the current run; returns when every thread has finished its last kernel.
    fn run(&self, tid: usize) {
        let n = self.nthreads;
        let (first, end) = (self.first.load(Ordering::Acquire), self.end.load(Ordering::Acquire));
        for l in &self.launches[first..end] {
            if !l.zero.is_empty() {
                for &(ptr, bytes) in &l.zero {
                    let (lo, hi) = (bytes * tid / n, bytes * (tid + 1) / n);
                    // SAFETY: `ptr..ptr + bytes` lies in a backend allocation (checked at load); threads zero
                    // disjoint slices, and no kernel runs until the barrier below.
                    unsafe { std::ptr::write_bytes(ptr.add(lo), 0, hi - lo) };
                }
                self.barrier.wait();
            }
            // SAFETY: the kernel ABI: one pointer per argument, each to storage of the argument's size (checked at
            // load); every tid in 0..n is called exactly once, concurrently.
            unsafe { (l.func)(l.args.as_ptr(), tid as i32, n as i32) };
            self.barrier.wait();
        }
    }
}

/// The worker threads and the launches they run.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `nthreads - 1` workers (at least one thread runs: the caller).
    pub fn new(launches: Vec<Launch>, nthreads: usize) -> std::io::Result<Pool> {
        let nthreads = nthreads.max(1);
        let end = AtomicUsize::new(launches.len());
        let shared = Arc::new(Shared {
            launches,
            nthreads,
            barrier: Barrier::new(nthreads),
            stop: AtomicBool::new(false),
            first: AtomicUsize::new(0),
            end,
        });
        let mut pool = Pool { shared, workers: vec![] };
        for tid in 1..nthreads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new().name(format!("tunec-cpu-{tid}")).spawn(move || loop {
                shared.barrier.wait();
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                shared.run(tid);
            });
            match handle {
                Ok(h) => pool.workers.push(h),
                Err(e) => {
                    // Release the workers already started (they wait for n threads, which will never come).
                    pool.abandon();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    pub fn nthreads(&self) -> usize {
        self.shared.nthreads
    }

    pub fn launches(&self) -> usize {
        self.shared.launches.len()
    }

    /// Runs launches `first..end` once, in order, on all threads; returns when all are done.
    pub fn run(&self, first: usize, end: usize) {
        assert!(first <= end && end <= self.shared.launches.len(), "launches {first}..{end} out of range");
        // Published before the barrier releases the workers (which read them after it).
        self.shared.first.store(first, Ordering::Release);
        self.shared.end.store(end, Ordering::Release);
        self.shared.barrier.wait();
        self.shared.run(0);
    }

    /// Stops the workers of a pool that could not start all its threads (its barrier can never fill): the
    /// barrier is broken, so they return from it, see the stop flag, and end.
    fn abandon(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.barrier.broken.store(true, Ordering::Release);
        {
            let _g = self.shared.barrier.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.barrier.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.workers.len() + 1 == self.shared.nthreads {
            self.shared.stop.store(true, Ordering::Release);
            self.shared.barrier.wait();
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}
