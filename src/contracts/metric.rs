//! The names a contract may gate on: metrics, reductions, comparisons, severities.
//!
//! Each is a closed enum with one spelling per variant, so that a contract naming a metric
//! nobody computes is rejected when it is read (with the closest valid name), never judged
//! as "no data" at the end of a run.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The spelling used in contract files and in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant spelt exactly `s`, if any.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// The valid spelling closest to `s` (for "did you mean" messages).
            pub fn closest(s: &str) -> &'static str {
                closest_name(s, $name::ALL.iter().map(|v| v.as_str()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown {} `{s}` (did you mean `{}`?)",
                        stringify!($name).to_lowercase(),
                        $name::closest(&s)
                    ))
                })
            }
        }
    };
}

named_enum! {
    /// A metric the metrics module computes between an engine's dump and a reference's.
    /// Samples are per scored position unless the metric says otherwise.
    Metric {
        /// ‖a−b‖/‖b‖ of the logits at one position.
        LogitsRelL2 = "logits.rel_l2",
        /// Cosine of the logit vectors at one position.
        LogitsCosine = "logits.cosine",
        /// Normalised mean squared error of the logits at one position.
        LogitsNmse = "logits.nmse",
        /// max |Δlogit| at one position.
        LogitsMaxAbs = "logits.max_abs",
        /// KL(reference ‖ engine) of the next-token distributions at one position.
        Kld = "kld",
        /// 1 where the engine's argmax equals the reference's, else 0.
        Top1 = "top1",
        /// Top-1 agreement where the reference's top-1/top-2 margin exceeds the tie
        /// threshold; elsewhere 1 when the engine's token is tied with the reference's top-1
        /// (within the threshold of it in the reference's logits: its top-2, or any as close).
        Top1MarginAware = "top1_margin_aware",
        /// |top-5(engine) ∩ top-5(reference)| / 5.
        Top5Overlap = "top5_overlap",
        /// |top-10(engine) ∩ top-10(reference)| / 10.
        Top10Overlap = "top10_overlap",
        /// Greedy tokens that match the reference's before the first divergence (per prompt).
        GreedyMatchLen = "greedy_match_len",
        /// Count of non-finite values (per tensor or position).
        Nonfinite = "nonfinite",
        /// ‖a−b‖/‖b‖ of one capture point at one layer.
        LayerRelL2 = "layer.rel_l2",
        /// Cosine of one capture point at one layer.
        LayerCosine = "layer.cosine",
        /// 1 where both sides recorded the same capture points, layers and positions, else 0.
        LayerCountParity = "layer.count_parity",
        /// 1 where the engine's own token ids for the prompt text equal the reference ids.
        TokenizerParity = "tokenizer_parity",
        /// Prompt tokens per second of the prefill.
        PrefillTokS = "prefill_tok_s",
        /// Generated tokens per second of the decode.
        DecodeTokS = "decode_tok_s",
        /// Time to first token, milliseconds.
        TtftMs = "ttft_ms",
        /// Model load time, milliseconds.
        LoadMs = "load_ms",
        /// Peak host resident memory, bytes.
        PeakRssBytes = "peak_rss_bytes",
    }
}

named_enum! {
    /// How a gate turns a metric's samples into one observed number.
    Reduction {
        Min = "min",
        Max = "max",
        Mean = "mean",
        /// Type-7 (linear) quantile at 0.5, as numpy's default.
        Median = "median",
        /// Type-7 (linear) quantile at 0.99, as numpy's default.
        P99 = "p99",
        /// Wilson score lower bound (95 %, z = 1.96) of the proportion of 1s in 0/1 samples.
        WilsonLower = "wilson_lower",
        /// Every sample must satisfy the comparison; the observed value is the worst sample.
        All = "all",
        /// The number of samples (guards against a gate passing on too few positions).
        Count = "count",
    }
}

named_enum! {
    /// What a gate's failure means for the run.
    Severity {
        /// A failed gate fails the run (exit 1).
        Error = "error",
        /// A failed gate is reported and stored but does not fail the run.
        Warning = "warning",
    }
}

/// How the observed value is compared with the threshold: `observed <op> threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
}

impl Comparison {
    pub const ALL: &'static [Comparison] =
        &[Comparison::Gt, Comparison::Ge, Comparison::Lt, Comparison::Le, Comparison::Eq];

    /// The spelling used in contract files and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
            Comparison::Lt => "<",
            Comparison::Le => "<=",
            Comparison::Eq => "==",
        }
    }

    /// Accepts the symbol or its two-letter name (`gt`, `ge`, `lt`, `le`, `eq`).
    pub fn parse(s: &str) -> Option<Comparison> {
        match s.trim() {
            ">" | "gt" => Some(Comparison::Gt),
            ">=" | "ge" => Some(Comparison::Ge),
            "<" | "lt" => Some(Comparison::Lt),
            "<=" | "le" => Some(Comparison::Le),
            "==" | "=" | "eq" => Some(Comparison::Eq),
            _ => None,
        }
    }

    /// The valid spelling closest to `s` (for "did you mean" messages).
    /// A reversed operator (`=<`, `=>`) suggests its mirror image.
    pub fn closest(s: &str) -> &'static str {
        let reversed: String = s.trim().chars().rev().collect();
        match Comparison::parse(&reversed) {
            Some(c) => c.as_str(),
            None => closest_name(s, Comparison::ALL.iter().map(|c| c.as_str())),
        }
    }

    /// `observed <op> threshold`; false whenever either side is NaN.
    pub fn holds(self, observed: f64, threshold: f64) -> bool {
        match self {
            Comparison::Gt => observed > threshold,
            Comparison::Ge => observed >= threshold,
            Comparison::Lt => observed < threshold,
            Comparison::Le => observed <= threshold,
            Comparison::Eq => observed == threshold,
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Comparison {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Comparison {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Comparison::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown comparison `{s}` (expected one of >, >=, <, <=, ==)"))
        })
    }
}

/// The candidate most similar to `s` by Jaro-Winkler similarity, which favours a shared
/// prefix (`wilson` -> `wilson_lower`, where edit distance would pick `min`); ties: the
/// first in order.
fn closest_name<'a>(s: &str, candidates: impl Iterator<Item = &'a str>) -> &'a str {
    let mut best = ("", f64::NEG_INFINITY);
    for c in candidates {
        let sim = strsim::jaro_winkler(s, c);
        if sim > best.1 {
            best = (c, sim);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::parse(m.as_str()), Some(*m));
        }
        for r in Reduction::ALL {
            assert_eq!(Reduction::parse(r.as_str()), Some(*r));
        }
        for c in Comparison::ALL {
            assert_eq!(Comparison::parse(c.as_str()), Some(*c));
        }
        assert_eq!(Metric::ALL.len(), 20);
    }

    #[test]
    fn closest_names() {
        assert_eq!(Metric::closest("logits.cosin"), "logits.cosine");
        assert_eq!(Metric::closest("logit.rel_l2"), "logits.rel_l2");
        assert_eq!(Metric::closest("kl"), "kld");
        assert_eq!(Metric::closest("layer_rel_l2"), "layer.rel_l2");
        assert_eq!(Reduction::closest("p90"), "p99");
        assert_eq!(Reduction::closest("wilson"), "wilson_lower");
        assert_eq!(Metric::closest("top_1"), "top1");
        assert_eq!(Metric::closest("kl_divergence"), "kld");
        assert_eq!(Metric::closest("decode_tps"), "decode_tok_s");
        assert_eq!(Severity::closest("warn"), "warning");
        assert_eq!(Comparison::closest("=>"), ">=");
    }
}
