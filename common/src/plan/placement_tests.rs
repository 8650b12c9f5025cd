use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

fn node(name: &str, is_head: bool, gpus: u32, reserved: &[u32]) -> ClusterNode {
    ClusterNode {
        id: format!("id-{name}"),
        name: name.into(),
        is_head,
        schedulable: true,
        gpus: (0..gpus)
            .map(|i| ClusterGpu {
                index: i,
                uuid: format!("{name}-{i}"),
                memory_total_bytes: 80 << 30,
                nvlink_peers: peer_mask((0..gpus).filter(|&p| p != i)),
                reserved: reserved.contains(&i),
            })
            .collect(),
    }
}

#[test]
fn gpu_specs_parse() {
    assert_eq!(Cluster::parse_spec("2x8x80GiB"), Ok((2, 8, 80 << 30)));
    for bad in ["8x80GiB", "0x8x80GiB", "2x8x0", "axbxc", "2x65x80GiB"] {
        assert!(Cluster::parse_spec(bad).expect_err(bad).contains("NODESxGPUSxMEMORY"));
    }
}

#[test]
fn one_node_beats_two_and_the_head_hosts_node_rank_0() {
    let c = Cluster::uniform(3, 8, 80 << 30);
    let p = place(&c, 8, 1, false).expect("fits");
    assert_eq!((p.nnodes, p.gpus_per_node), (1, 8));
    assert!(p.ranks.iter().all(|r| r.node == "node-0"), "the head, node-0, has the GPUs");

    let p = place(&c, 8, 2, false).expect("fits");
    assert_eq!(p.nnodes, 2);
    assert_eq!(p.ranks[0].node, "node-0");
    assert_eq!(p.ranks[0].node_rank, 0);
    assert_eq!(p.ranks[8].node_rank, 1);
    assert_eq!((p.ranks[9].pp_rank, p.ranks[9].tp_rank), (1, 1));
    assert!(!p.tp_spans_nodes);
}

#[test]
fn a_busy_head_gives_node_rank_0_to_another_node() {
    let c = Cluster { nodes: vec![node("head", true, 4, &[0, 1, 2, 3]), node("w1", false, 4, &[])] };
    let p = place(&c, 4, 1, true).expect("fits on w1");
    assert!(p.ranks.iter().all(|r| r.node == "w1"));
}

#[test]
fn the_shortfall_names_the_layout_and_the_free_gpus() {
    let c = Cluster {
        nodes: vec![
            node("node-a", true, 8, &[]),
            node("node-b", false, 8, &[0, 1, 2, 3]),
            node("node-c", false, 4, &[]),
        ],
    };
    let e = place(&c, 8, 2, true).expect_err("no second node with 8 free");
    assert_eq!(e.to_string(), "need 16 GPUs as 2 nodes x 8; free: node-a 8, node-b 4, node-c 4");
}

#[test]
fn tp_groups_take_nvlink_islands() {
    let mut n = node("w", true, 8, &[1]);
    for g in &mut n.gpus {
        let island = if g.index < 4 { 0..4 } else { 4..8 };
        g.nvlink_peers = peer_mask(island.filter(|&p| p != g.index));
    }
    let c = Cluster { nodes: vec![n] };
    let p = place(&c, 4, 1, true).expect("fits");
    let gpus: Vec<u32> = p.ranks.iter().map(|r| r.gpu_index).collect();
    assert_eq!(gpus, vec![4, 5, 6, 7], "the whole island, not 0,2,3 plus a stranger");
    assert!(p.warnings.is_empty());

    let p = place(&c, 2, 3, true).expect("fits");
    for pair in p.ranks.chunks(2) {
        assert_eq!(pair[0].gpu_index < 4, pair[1].gpu_index < 4, "each TP pair inside one island: {pair:?}");
    }
    assert!(p.warnings.is_empty());
}

#[test]
fn tp_across_nodes_is_a_warning_or_with_strict_an_error() {
    let c = Cluster::uniform(4, 4, 80 << 30);
    let p = place(&c, 8, 2, false).expect("spans");
    assert!(p.tp_spans_nodes);
    assert_eq!((p.nnodes, p.gpus_per_node), (4, 4));
    assert!(p.warnings.iter().any(|w| w.contains("spans nodes")));
    let e = place(&c, 8, 2, true).expect_err("strict");
    assert!(e.to_string().contains("inside one node"), "{e}");
}

#[test]
fn best_fit_keeps_big_nodes_whole() {
    let c = Cluster { nodes: vec![node("big", false, 8, &[]), node("small", false, 4, &[])] };
    let p = place(&c, 4, 1, true).expect("fits");
    assert!(p.ranks.iter().all(|r| r.node == "small"));
}

#[test]
fn unschedulable_and_reserved_gpus_are_never_used() {
    let mut dead = node("dead", true, 8, &[]);
    dead.schedulable = false;
    let c = Cluster { nodes: vec![dead, node("w", false, 8, &[0, 1, 2, 3, 4, 5])] };
    let p = place(&c, 2, 1, true).expect("fits");
    assert_eq!(p.ranks.iter().map(|r| r.gpu_index).collect::<Vec<_>>(), vec![6, 7]);
    let e = place(&c, 4, 1, true).expect_err("only 2 free");
    assert!(e.to_string().contains("dead, left or draining"), "{e}");
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    prop::collection::vec((1u32..=8, prop::collection::vec(any::<bool>(), 8), any::<bool>(), 0u8..4), 1..7).prop_map(
        |nodes| {
            Cluster {
                nodes: nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (gpus, reserved, schedulable, links))| {
                        let res: Vec<u32> = (0..gpus).filter(|&g| reserved[g as usize]).collect();
                        let mut n = node(&format!("n{i}"), i == 0, gpus, &res);
                        n.schedulable = schedulable || i == 0;
                        if links == 0 {
                            for g in &mut n.gpus {
                                g.nvlink_peers = 0; // a PCIe-only node
                            }
                        }
                        n
                    })
                    .collect(),
            }
        },
    )
}

proptest! {
    #[test]
    fn placements_are_sound_and_deterministic(c in arb_cluster(), tp in prop::sample::select(vec![1u64, 2, 4, 8]), pp in 1u64..4, strict in any::<bool>()) {
        let first = place(&c, tp, pp, strict);
        prop_assert_eq!(&first, &place(&c, tp, pp, strict), "deterministic");
        let Ok(p) = first else { return Ok(()) };
        let world = tp * pp;
        prop_assert_eq!(p.ranks.len() as u64, world);
        let mut seen = HashSet::new();
        for (i, r) in p.ranks.iter().enumerate() {
            prop_assert_eq!(r.rank, i as u64);
            prop_assert_eq!(r.rank, r.pp_rank * tp + r.tp_rank);
            prop_assert!(seen.insert(r.gpu_uuid.clone()), "GPU {} reserved twice", r.gpu_uuid);
            let n = c.nodes.iter().find(|n| n.name == r.node).expect("node exists");
            prop_assert!(n.schedulable);
            let g = n.gpus.iter().find(|g| g.index == r.gpu_index).expect("gpu exists");
            prop_assert!(!g.reserved, "a reserved GPU was chosen");
            prop_assert_eq!(&g.uuid, &r.gpu_uuid);
            prop_assert_eq!(r.node_rank, r.rank / p.gpus_per_node, "consecutive ranks per node");
        }
        if strict {
            for group in p.ranks.chunks(tp as usize) {
                prop_assert!(group.iter().all(|r| r.node == group[0].node), "TP group spans nodes under strict");
            }
        }
        // Node rank 0 is the head whenever the head could host it.
        let head_free = c.nodes[0].gpus.iter().filter(|g| !g.reserved).count() as u64;
        if head_free >= p.gpus_per_node && !p.tp_spans_nodes {
            prop_assert!(c.nodes[0].schedulable && p.ranks[0].node == c.nodes[0].name);
        }
    }
}
