//! Pipeline stages: which layers each stage holds, exactly as vLLM's `get_pp_indices` assigns them.

use serde::Serialize;

/// One pipeline stage's layers, `layer_start..layer_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stage {
    pub pp_rank: u64,
    pub layer_start: u64,
    /// Exclusive.
    pub layer_end: u64,
    pub num_layers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "pipeline parallel size {pp} is larger than the model's {layers} layers; each stage needs at least one layer: use --pp {layers} or less"
    )]
    TooManyStages { pp: u64, layers: u64 },
    #[error("pipeline parallel size must be at least 1")]
    ZeroStages,
    #[error(
        "layer partition {given:?} has {len} entries but pipeline parallel size is {pp}: give exactly one layer count per stage"
    )]
    WrongLength { given: Vec<u64>, len: usize, pp: u64 },
    #[error(
        "layer partition {given:?} sums to {sum} but the model has {layers} layers: the counts must add up to {layers}"
    )]
    WrongSum { given: Vec<u64>, sum: u64, layers: u64 },
}

/// vLLM's rule: every stage gets `L / pp`; the `L % pp` extra layers go one each to stages
/// `pp-2, pp-3, ...` (never to the last stage, which also holds the LM head).
pub fn layer_counts(layers: u64, pp: u64) -> Result<Vec<u64>, PartitionError> {
    if pp == 0 {
        return Err(PartitionError::ZeroStages);
    }
    if pp > layers {
        return Err(PartitionError::TooManyStages { pp, layers });
    }
    let mut counts = vec![layers / pp; pp as usize];
    let extra = (layers % pp) as usize;
    let n = counts.len();
    for i in 2..extra + 2 {
        counts[n - i] += 1;
    }
    Ok(counts)
}

/// An explicit partition (`--layer-partition`, or `VLLM_PP_LAYER_PARTITION`): one count per stage,
/// summing to the layer count.
pub fn check_override(given: &[u64], layers: u64, pp: u64) -> Result<Vec<u64>, PartitionError> {
    if pp == 0 {
        return Err(PartitionError::ZeroStages);
    }
    if given.len() as u64 != pp {
        return Err(PartitionError::WrongLength { given: given.to_vec(), len: given.len(), pp });
    }
    let sum: u64 = given.iter().fold(0u64, |a, &b| a.saturating_add(b));
    if sum != layers {
        return Err(PartitionError::WrongSum { given: given.to_vec(), sum, layers });
    }
    Ok(given.to_vec())
}

/// Parses `23,4` (the flag's and vLLM's env var's syntax).
pub fn parse_partition(s: &str) -> Result<Vec<u64>, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u64>()
                .map_err(|_| format!("invalid layer partition {s:?}: {p:?} is not a whole number; write e.g. 40,40"))
        })
        .collect()
}

pub fn stages(counts: &[u64]) -> Vec<Stage> {
    let mut start = 0;
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = Stage { pp_rank: i as u64, layer_start: start, layer_end: start + n, num_layers: n };
            start += n;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_vllm_examples() {
        assert_eq!(layer_counts(126, 4), Ok(vec![31, 32, 32, 31]));
        assert_eq!(layer_counts(80, 2), Ok(vec![40, 40]));
        assert_eq!(layer_counts(61, 8), Ok(vec![7, 7, 8, 8, 8, 8, 8, 7]));
        assert_eq!(layer_counts(28, 8), Ok(vec![3, 3, 3, 4, 4, 4, 4, 3]));
        assert_eq!(layer_counts(5, 5), Ok(vec![1, 1, 1, 1, 1]));
        assert_eq!(layer_counts(4, 5), Err(PartitionError::TooManyStages { pp: 5, layers: 4 }));
    }

    #[test]
    fn overrides_are_checked() {
        assert_eq!(check_override(&[23, 4], 27, 2), Ok(vec![23, 4]));
        assert!(matches!(check_override(&[23, 4], 28, 2), Err(PartitionError::WrongSum { sum: 27, .. })));
        assert!(matches!(check_override(&[27], 27, 2), Err(PartitionError::WrongLength { len: 1, .. })));
        assert_eq!(parse_partition("23, 4"), Ok(vec![23, 4]));
        assert!(parse_partition("23,x").expect_err("bad").contains("\"x\""));
        let s = stages(&[2, 3]);
        assert_eq!((s[1].layer_start, s[1].layer_end, s[1].num_layers), (2, 5, 3));
    }

    proptest! {
        #[test]
        fn partitions_sum_to_l_and_follow_the_rule(layers in 1u64..500, pp in 1u64..64) {
            prop_assume!(pp <= layers);
            let c = layer_counts(layers, pp).expect("pp <= layers");
            prop_assert_eq!(c.len() as u64, pp);
            prop_assert_eq!(c.iter().sum::<u64>(), layers);
            let base = layers / pp;
            let extra = layers % pp;
            prop_assert!(c.iter().all(|&n| n == base || n == base + 1));
            prop_assert_eq!(c[pp as usize - 1], base, "the last stage never gets an extra layer");
            // The extra layers sit on the stages just before the last one.
            for (i, &n) in c.iter().enumerate() {
                let from_end = pp as usize - 1 - i; // 0 for the last stage
                prop_assert_eq!(n == base + 1, from_end >= 1 && from_end as u64 <= extra);
            }
            let st = stages(&c);
            prop_assert_eq!(st.last().map(|s| s.layer_end), Some(layers));
        }
    }
}
