//! The dm-user fuzz harness under a periodic SIGALRM, as libFuzzer runs it: libFuzzer arms
//! an interval timer (every `timeout / 2 + 1` seconds) whose signal lands on whichever
//! thread is running, often a transport worker asleep in `poll`. Every request must still
//! be answered. Its own test binary without the libtest harness, so that the worker runs on
//! the main thread (where the kernel delivers a process-wide signal first, and where
//! libFuzzer runs its target) and the timer disturbs no other test.

use snapuserd::fuzz_harness::{DmUserFixture, FixtureCow};

extern "C" fn on_alarm(_: libc::c_int) {}

/// Arm (or, with 0, disarm) a SIGALRM every `micros` microseconds.
fn set_alarm_interval(micros: libc::suseconds_t) {
    let every = libc::timeval {
        tv_sec: 0,
        tv_usec: micros,
    };
    let timer = libc::itimerval {
        it_interval: every,
        it_value: every,
    };
    // SAFETY: setitimer reads the struct we pass and writes nothing (null old value).
    let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

fn main() {
    every_request_is_answered_while_alarms_interrupt_the_worker();
    println!("every request answered under SIGALRM");
}

fn every_request_is_answered_while_alarms_interrupt_the_worker() {
    // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGALRM.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()), 0);
    }
    let fixture = DmUserFixture::create().expect("fixture");
    let seeds: Vec<Vec<u8>> = FixtureCow::ALL
        .into_iter()
        .flat_map(|variant| fixture.seed_streams(variant))
        .collect();
    set_alarm_interval(200);
    for _ in 0..25 {
        for seed in &seeds {
            fixture.run_stream(seed);
        }
    }
    set_alarm_interval(0);
}
