//! Property tests with hostile input: parsers and proto conversions never panic and never allocate
//! from a lying length. They run with the normal test suite (the cargo-fuzz targets in `fuzz/`
//! explore further with coverage guidance).

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tessera_proto::v1 as pb;

    use crate::model::parse_config;
    use crate::model::safetensors::{WeightBytes, parse_header};
    use crate::node::{Inventory, JoinInfo};

    /// JSON values of any shape, biased towards the keys a config has.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
            ".{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            let keys = prop_oneof![
                Just("num_attention_heads".to_string()),
                Just("num_key_value_heads".to_string()),
                Just("hidden_size".to_string()),
                Just("num_hidden_layers".to_string()),
                Just("vocab_size".to_string()),
                Just("head_dim".to_string()),
                Just("intermediate_size".to_string()),
                Just("num_local_experts".to_string()),
                Just("moe_intermediate_size".to_string()),
                Just("kv_lora_rank".to_string()),
                Just("text_config".to_string()),
                Just("quantization_config".to_string()),
                Just("weight_block_size".to_string()),
                Just("quant_method".to_string()),
                Just("torch_dtype".to_string()),
                "[a-z_]{1,10}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(keys, inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn config_parser_never_panics_on_any_json(v in json_value()) {
            let text = v.to_string();
            if let Ok(m) = parse_config("fuzz.json", &text) {
                // Whatever it accepts is internally consistent and plannable.
                prop_assert!(m.num_attention_heads > 0 && m.num_hidden_layers > 0);
                prop_assert!(m.num_key_value_heads >= 1 && m.num_key_value_heads <= m.num_attention_heads);
                let _ = crate::plan::rules::valid_tp_sizes(&m);
                let _ = crate::plan::memory::Weights::estimate(&m);
            }
        }

        #[test]
        fn config_parser_never_panics_on_any_text(s in ".{0,200}") {
            let _ = parse_config("fuzz.json", &s);
        }

        #[test]
        fn safetensors_header_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), data_len in any::<Option<u64>>()) {
            if let Ok(t) = parse_header(&bytes, data_len) {
                let _ = WeightBytes::from_tensors(4, &t);
            }
        }

        #[test]
        fn huge_tensor_sizes_do_not_overflow_the_sums(sizes in prop::collection::vec(any::<u64>(), 1..6)) {
            let tensors: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &b)| crate::model::safetensors::TensorInfo { name: format!("model.layers.0.w{i}"), dtype: "F4".into(), bytes: b })
                .collect();
            let w = WeightBytes::from_tensors(1, &tensors);
            prop_assert!(w.total() >= *sizes.iter().max().expect("non-empty"));
        }

        #[test]
        fn safetensors_headers_with_lying_shapes_are_refused(dims in prop::collection::vec(any::<u64>(), 0..4), end in any::<u64>()) {
            let header = serde_json::json!({"t": {"dtype": "BF16", "shape": dims, "data_offsets": [0, end]}}).to_string();
            if let Ok(t) = parse_header(header.as_bytes(), None) {
                let elems: u128 = dims.iter().map(|&d| d as u128).product();
                prop_assert_eq!(elems * 2, t[0].bytes as u128, "accepted only when the shape matches the offsets");
            }
        }

        #[test]
        fn join_conversion_never_panics(
            node_id in ".{0,40}",
            name in ".{0,70}",
            labels in prop::collection::hash_map(".{0,20}", ".{0,40}", 0..70),
            addr in ".{0,20}",
            gpus in prop::collection::vec((any::<u32>(), ".{0,10}", any::<u64>(), any::<u64>(), prop::collection::vec(any::<u32>(), 0..10)), 0..70),
            source in ".{0,6}",
        ) {
            let inventory = pb::Inventory {
                gpus: gpus
                    .into_iter()
                    .map(|(index, uuid, total, used, peers)| pb::Gpu {
                        index,
                        uuid,
                        memory_total_bytes: total,
                        memory_used_bytes: used,
                        nvlink_peers: peers,
                        ..Default::default()
                    })
                    .collect(),
                source,
                ..Default::default()
            };
            let req = pb::JoinRequest { node_id, name, labels, advertise_address: addr, inventory: Some(inventory.clone()), ..Default::default() };
            if let Ok(j) = JoinInfo::try_from(req) {
                prop_assert!(j.inventory.gpus.len() <= crate::node::MAX_GPUS_PER_NODE);
                prop_assert!(j.labels.len() <= 64);
            }
            let _ = Inventory::try_from(inventory);
        }
    }
}

#[cfg(test)]
mod extremes {
    use proptest::prelude::*;

    use crate::model::parse_config;
    use crate::plan::placement::Cluster;
    use crate::plan::{PlanRequest, Size, memory::Weights, plan};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Valid configs with extreme sizes plan without overflow panics.
        #[test]
        fn extreme_but_valid_configs_plan_without_panicking(
            heads in 1u64..=256,
            kv_div in 1u64..=8,
            hidden_mul in 1u64..=(1 << 20),
            layers in 1u64..=100_000,
            vocab in 1u64..=(1u64 << 40),
            inter in 1u64..=(1u64 << 40),
            experts in prop::option::of(2u64..=1024),
            tp in 1u64..=64,
            pp in 1u64..=64,
        ) {
            let kv = (heads / kv_div).max(1);
            let hidden = heads * hidden_mul;
            let mut cfg = serde_json::json!({
                "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden,
                "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter,
                "max_position_embeddings": 1u64 << 40,
            });
            if let Some(e) = experts {
                cfg["num_local_experts"] = serde_json::json!(e);
            }
            let m = parse_config("x.json", &cfg.to_string()).expect("valid config");
            let w = Weights::estimate(&m);
            let r = plan(&m, &w, &Cluster::uniform(2, 8, 80 << 30), &PlanRequest { tp: Size::Fixed(tp), pp: Size::Fixed(pp), ..Default::default() });
            prop_assert_eq!(r.valid, r.errors.is_empty());
        }
    }
}
