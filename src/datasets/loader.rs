//! The one batch loader of the trainers: shards read on a loader thread in a seeded order,
//! rows shuffled within each shard, batches sent over a bounded channel.

use crossbeam_channel::{bounded, Receiver};

use crate::error::Result;
use crate::rng::SplitMix64;

/// The one batch loader of the trainers: a thread walks `shards` shards (in a seeded order
/// when `shuffle` gives a seed and a label, else in order), loads each with `load`, shuffles
/// its rows with the same generator, and sends `make`'s batches of `batch_size` rows over a
/// bounded channel. The first error is sent and ends the stream; dropping the receiver
/// stops the thread.
pub fn shard_batches<R, B>(
    shards: usize,
    load: impl Fn(usize) -> Result<Vec<R>> + Send + 'static,
    make: impl Fn(&[R]) -> Result<B> + Send + 'static,
    batch_size: usize,
    shuffle: Option<(u64, String)>,
    capacity: usize,
) -> Receiver<Result<B>>
where
    R: Send + 'static,
    B: Send + 'static,
{
    let (tx, rx) = bounded(capacity.max(1));
    std::thread::spawn(move || {
        let mut order: Vec<usize> = (0..shards).collect();
        let mut rng = shuffle.map(|(seed, label)| SplitMix64::derived(seed, &label));
        if let Some(rng) = rng.as_mut() {
            rng.shuffle(&mut order);
        }
        for i in order {
            let mut rows = match load(i) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if let Some(rng) = rng.as_mut() {
                rng.shuffle(&mut rows);
            }
            for chunk in rows.chunks(batch_size.max(1)) {
                let batch = make(chunk);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        }
    });
    rx
}
