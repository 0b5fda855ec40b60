use super::*;

#[test]
fn one_thread_per_item_covers_every_item_with_whole_blocks() {
    for items in [0, 1, 255, 256, 257, 64 * 10, 8192 * 6 * 28 * 28] {
        let g = Geometry::per_item("k", items).unwrap();
        assert_eq!(g.threads, THREADS);
        assert!(g.threads_in_all() >= items as u64, "{items}");
        // No block is launched wholly past the end (an empty launch keeps one).
        assert!(g.threads_in_all() < items as u64 + THREADS as u64 || items == 0);
        assert!(g.blocks >= 1);
    }
}

#[test]
fn a_launch_too_large_for_the_kernels_counts_is_refused() {
    let items = u32::MAX as usize + 1;
    let error = Geometry::per_item("sgd_step", items).unwrap_err();
    assert_eq!(error.items, items as u64);
    assert!(error.to_string().starts_with("sgd_step: 4294967296 items"));
    assert!(Geometry::per_item("k", u32::MAX as usize).is_ok());
}

#[test]
fn sums_take_one_block_per_group_of_a_power_of_two_threads() {
    assert!(REDUCE_THREADS.is_power_of_two() && REDUCE_THREADS <= 1024);
    let g = Geometry::per_group("channel_sums", 120).unwrap();
    assert_eq!((g.blocks, g.threads), (120, REDUCE_THREADS));
    assert!(Geometry::per_group("channel_sums", 0).is_err());
}

#[test]
fn the_tail_pools_only_even_planes() {
    assert_eq!(tail_outputs((64, 6, 28, 28), true), Some(64 * 6 * 14 * 14));
    assert_eq!(tail_outputs((64, 120, 1, 1), false), Some(64 * 120));
    assert_eq!(tail_outputs((2, 3, 5, 4), true), None);
}

#[test]
fn adam_factors_are_rounded_once_from_f64() {
    let settings = AdamSettings {
        lr: 0.003,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
        decoupled: true,
        step: 3,
    };
    let f = AdamFactors::new(&settings);
    assert_eq!(f.keep1, (1.0f64 - 0.9) as f32);
    assert_ne!(
        f.keep1,
        1.0f32 - 0.9f32,
        "rounded from f64, not f32 arithmetic"
    );
    assert_eq!(f.shrink, (1.0 - 0.003 * 0.05) as f32);
    assert_eq!(f.l2, 0.0);
    assert_eq!(f.inv_c2, (1.0 / (1.0 - 0.999f64.powi(3))) as f32);
    let adam = AdamFactors::new(&AdamSettings {
        decoupled: false,
        ..settings
    });
    assert_eq!((adam.shrink, adam.l2), (1.0, 0.05));
    let plain = AdamFactors::new(&AdamSettings {
        weight_decay: 0.0,
        ..settings
    });
    assert_eq!((plain.shrink, plain.l2), (1.0, 0.0));
}
