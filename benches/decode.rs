//! Decode throughput: JSON lines from the generator -> Arrow batches.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pulse::config::ValidationConfig;
use pulse::decode::Decoder;
use pulse::model::{Position, RawChunk};
use pulse::source::generator::{GenParams, Generator};

fn chunk(n: u64) -> RawChunk {
    let mut g = Generator::new(GenParams {
        events: n,
        ..GenParams::default()
    });
    let mut c = RawChunk::new("bench".into());
    let mut line = Vec::new();
    let mut i = 0;
    loop {
        line.clear();
        if g.next_into(&mut line).is_none() {
            return c;
        }
        i += 1;
        c.push(
            &line,
            Position {
                partition: 0,
                offset: i,
            },
        );
    }
}

fn decode(c: &mut Criterion) {
    let input = chunk(32_768);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(input.len() as u64));
    g.bench_function("32k_events", |b| {
        let mut d = Decoder::new(ValidationConfig::default());
        b.iter(|| d.decode(&input, 0))
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
