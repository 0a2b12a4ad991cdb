//! The `resume_state` and `config` fuzz harnesses (`fuzz/src/state_config.rs`) on stable Rust:
//! valid seeds and deterministic random mutations of them. `INFDIT_FUZZ_ITERS` sets the number of
//! mutations per target (default 300; `fuzz/README.md` gives the longer runs made).
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

#[path = "../../../fuzz/src/state_config.rs"]
mod state_config;

use candle_core::{Device, Tensor};
use state_config::{FINGERPRINT, GRID};

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> usize {
    std::env::var("INFDIT_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// A byte-level mutation: flips, overwrites with boundary values, inserts, deletes, truncation.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(m.len());
        match rng.below(6) {
            0 if !m.is_empty() => m[i] ^= 1 << rng.below(8),
            1 if !m.is_empty() => m[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)],
            2 => m.insert(i.min(m.len()), rng.next() as u8),
            3 if !m.is_empty() => {
                m.remove(i);
            }
            4 => m.truncate(i),
            _ if m.len() >= 4 => {
                let v = [u32::MAX, 0, 1 << 31, 4096][rng.below(4)];
                let j = rng.below(m.len() - 3);
                m[j..j + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    m
}

/// A text mutation for JSON: a number replaced by a boundary value, or a byte-level mutation.
fn mutate_json(seed: &str, rng: &mut Rng) -> Vec<u8> {
    const VALUES: [&str; 9] =
        ["0", "1", "3", "18446744073709551615", "4294967296", "-1", "1e308", "4611686018427387904", "0.5"];
    let digits: Vec<usize> = seed.char_indices().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
    if rng.below(3) == 0 || digits.is_empty() {
        return mutate(seed.as_bytes(), rng);
    }
    let start = digits[rng.below(digits.len())];
    let end = seed[start..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-'))
        .map_or(seed.len(), |e| start + e);
    format!("{}{}{}", &seed[..start], VALUES[rng.below(VALUES.len())], &seed[end..]).into_bytes()
}

#[test]
fn fuzz_resume_state_seeds_and_mutations() {
    let dir = std::env::temp_dir().join(format!("infdit-fuzz-state-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Seeds: a record holding x and a state-folder record.
    let x = Tensor::ones((1, 3, GRID.height(), GRID.width()), candle_core::DType::F32, &Device::Cpu).unwrap();
    let seed_dir = dir.join("seeds");
    infdit::checkpoint::save_state(&seed_dir.join("x.safetensors"), Some(&x), 2, FINGERPRINT).unwrap();
    infdit::checkpoint::save_block_record(&seed_dir.join("b.safetensors"), &[1, 2, 3, 4], 3, FINGERPRINT).unwrap();
    let seeds = [
        std::fs::read(seed_dir.join("x.safetensors")).unwrap(),
        std::fs::read(seed_dir.join("b.safetensors")).unwrap(),
    ];
    for s in &seeds {
        assert!(state_config::resume_state(s, &dir.join("run")).unwrap() >= 1, "a seed must be accepted");
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (n, mut accepted) = (iterations(), 0);
    for k in 0..n {
        let m = mutate(&seeds[k % 2], &mut rng);
        accepted += state_config::resume_state(&m, &dir.join("run")).unwrap();
    }
    println!("resume_state: {n} mutations, {accepted} accepted reads (all others refused cleanly)");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_config_seeds_and_mutations() {
    let parity = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/parity/config.json"))
        .unwrap_or_else(|_| infdit::ModelConfig::released().to_json());
    let own = infdit::ModelConfig::released().to_json();
    let with_sampler = own.replacen('{', r#"{"sampler": {"steps": 20, "sigma_max": 40.0}, "#, 1);
    let seeds = [parity, own, with_sampler];
    for s in &seeds {
        assert!(state_config::config(s.as_bytes()), "a seed must parse");
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (n, mut accepted) = (iterations(), 0);
    for k in 0..n {
        let m = mutate_json(&seeds[k % seeds.len()], &mut rng);
        accepted += state_config::config(&m) as usize;
    }
    println!("config: {n} mutations, {accepted} accepted");
}
