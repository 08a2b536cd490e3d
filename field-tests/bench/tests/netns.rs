//! Field test: four stages in four network namespaces linked by veth through a
//! bridge, links shaped with `tc … tbf`. The bandwidth drops from 1 Gb/s to
//! 50 Mb/s mid-run and comes back: nothing is lost or corrupted, the planner
//! weighs each change within 5 s (a new plan, or its verdict that the running
//! one stays), and throughput under the plan in force is near its prediction.
//! Skipped, saying why, where namespaces cannot be made (not root, no iproute2).

mod common;

use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
use lime_kernels::{Checkpoint, Device, GenerateRequest, Model};
use lime_testbench::netns::Fabric;
use lime_testbench::swing::{self, SwingSpec};

#[test]
fn a_bandwidth_swing_is_weighed_in_time_and_loses_nothing() {
    if let Some(why) = Fabric::unavailable() {
        eprintln!("SKIPPED a_bandwidth_swing_is_weighed_in_time_and_loses_nothing: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small");
    synth::synthesize(
        &SynthSpec::preset(Preset::Small, StoredDtype::F32, 5),
        &model,
        &mut |_, _| {},
    )
    .unwrap();
    let fabric = Fabric::create("swt", 4).unwrap();
    // LIME_SWING_LOGS keeps the processes' logs there after the test.
    let logs = std::env::var_os("LIME_SWING_LOGS")
        .map_or_else(|| dir.path().join("run"), std::path::PathBuf::from);
    let spec = SwingSpec::standard(model.clone(), logs, true);
    let run = common::runtime()
        .block_on(swing::run(&spec, &fabric, |m| eprintln!("swing: {m}")))
        .unwrap();
    eprintln!("plans: {:?}", run.plans);

    // Nothing lost: every request answered, none failed.
    assert!(run.failed.is_empty(), "failed: {:?}", run.failed);
    assert!(
        run.completed >= spec.concurrency,
        "{} answers",
        run.completed
    );

    // Nothing corrupted: every answer equals the single-process run.
    let ckpt = Checkpoint::open(&model).unwrap();
    let reference = Model::load(&ckpt, &Device::Cpu, |_, _| {}).unwrap();
    let tokenizer = lime_kernels::TextTokenizer::from_path(&model).unwrap();
    for (k, answers) in &run.tokens {
        let r = swing::request(*k, spec.max_tokens);
        let prompt = tokenizer
            .encode(r.prompt.as_deref().unwrap(), true)
            .unwrap();
        let req = GenerateRequest {
            prompt: &prompt,
            max_tokens: spec.max_tokens as usize,
            sampling: r.sampling().unwrap(),
            stop_tokens: Vec::new(),
        };
        let want =
            lime_kernels::generate(&reference, &req, |_, _| std::ops::ControlFlow::Continue(()))
                .unwrap()
                .tokens;
        for got in answers {
            assert_eq!(
                got, &want,
                "template {k}: tokens differ from the single-process run"
            );
        }
    }

    // Every change weighed within 5 s: a new plan follows, or the planner
    // says why the running one stays (at 50 Mb/s this model's activations
    // still cross a hop in about a millisecond, so staying can be right).
    let ends = [
        spec.phases_s[0] + spec.phases_s[1],
        spec.phases_s.iter().sum(),
    ];
    for (&(at, mbit), end) in run.shaped.iter().zip(ends) {
        let seen = run.review_after(at).unwrap_or_else(|| {
            panic!(
                "the planner never weighed the change to {mbit} Mb/s at {at:.1} s; the link reports:\n{}",
                run.link_reports(at, end)
            )
        });
        assert!(
            seen.at_s - at <= 5.0,
            "the change to {mbit} Mb/s was weighed {:.1} s after it; the link reports:\n{}",
            seen.at_s - at,
            run.link_reports(at, seen.at_s)
        );
        // Under the plan in force, from when it runs at its own pace (a new
        // plan once every sequence's cache is rebuilt, the switch's one-off
        // cost reported apart), decode throughput to the end of the phase
        // against its prediction under the new conditions: within 15%.
        let (from, predicted, how) = if seen.review.kept {
            let running = seen
                .review
                .running
                .as_ref()
                .expect("a kept plan is evaluated under the new conditions");
            (seen.at_s.ceil(), running.tokens_per_s, "kept".to_string())
        } else {
            let plan = run
                .plan_after(seen.at_s)
                .unwrap_or_else(|| panic!("no new plan after the verdict at {:.1} s", seen.at_s));
            assert!(
                plan.at_s - at <= 5.0,
                "the plan for {mbit} Mb/s came {:.1} s after the change",
                plan.at_s - at
            );
            let rebuilt = plan.rebuilt_at_s.unwrap_or_else(|| {
                panic!("the caches were never rebuilt under epoch {}", plan.epoch)
            });
            let predicted = plan.prediction.as_ref().unwrap().tokens_per_s;
            let how = format!(
                "new plan {:.1} s after the change, caches rebuilt {:.1} s after it",
                plan.at_s - at,
                rebuilt - plan.at_s
            );
            (rebuilt.ceil(), predicted, how)
        };
        assert!(
            end - from >= 3.0,
            "at {mbit} Mb/s the plan ran at its own pace only from {from:.1} s: too little of the phase is left to measure"
        );
        // Steady decode, as predicted: the seconds in which a new request's
        // prompt was prefilled (a cohort of 16 every so often) are left out.
        let measured = run.decode_tokens_per_s(from, end, 3).unwrap_or_else(|| {
            panic!(
                "at {mbit} Mb/s fewer than 3 s from {from:.0} to {end:.0} s were free of prefills"
            )
        });
        eprintln!(
            "{mbit} Mb/s: weighed {:.1} s after the change ({}), {how}; \
             measured {measured:.1} tokens/s over {from:.0}..{end:.0} s, predicted {predicted:.1} ({:+.0}%)",
            seen.at_s - at,
            seen.review.changes,
            (measured / predicted - 1.0) * 100.0
        );
        assert!(
            (measured / predicted - 1.0).abs() <= 0.15,
            "at {mbit} Mb/s measured {measured:.1} tokens/s against a prediction of {predicted:.1}; \
             the link reports from the change to the verdict:\n{}",
            run.link_reports(at, seen.at_s)
        );
    }
}
