//! The buffers one handler's workers produce READ answers into, shared between them.
//!
//! A READ of up to 1 MiB is produced (wholly, or its changed blocks when answered in
//! pieces) into a buffer that keeps its capacity for the next request. Were each worker to
//! own one, every worker that ever answered a large READ would keep 1 MiB resident, however
//! few requests are in flight. Taken from a shared free list for the time of one answer and
//! given back after it, there are only as many buffers as answers that were ever produced at
//! the same time: one for a reader at queue depth 1, whichever worker the kernel wakes.

use std::sync::Mutex;

/// A free list of answer buffers (see the module documentation). At most one buffer per
/// worker is ever out, so the list never holds more buffers than the handler has workers.
#[derive(Debug, Default)]
pub struct AnswerBuffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl AnswerBuffers {
    /// A buffer to produce one answer into: the last one given back, or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    /// Return `buffer` (its capacity kept) for the next answer of any worker.
    pub fn give_back(&self, buffer: Vec<u8>) {
        if buffer.capacity() == 0 {
            return;
        }
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(buffer);
    }

    /// Buffers waiting in the list.
    pub fn idle(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_the_next_one_taken_with_its_capacity() {
        let buffers = AnswerBuffers::default();
        let mut first = buffers.take();
        assert_eq!(first.capacity(), 0);
        first.reserve(1 << 20);
        let ptr = first.as_ptr();
        buffers.give_back(first);
        assert_eq!(buffers.idle(), 1);
        let again = buffers.take();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.capacity() >= 1 << 20);
        assert_eq!(buffers.idle(), 0);
    }

    #[test]
    fn buffers_out_at_the_same_time_are_distinct_and_empty_ones_are_not_kept() {
        let buffers = AnswerBuffers::default();
        let (mut a, mut b) = (buffers.take(), buffers.take());
        a.reserve(4096);
        b.reserve(4096);
        assert_ne!(a.as_ptr(), b.as_ptr());
        buffers.give_back(a);
        buffers.give_back(b);
        buffers.give_back(Vec::new());
        assert_eq!(buffers.idle(), 2);
    }
}
