//! `dead_code`: removes the nodes no output depends on (inputs stay: they are the model's
//! interface) and the stored tensors no remaining weight node reads, so that an artifact
//! does not carry them.

use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::Graph;

/// The pass: see the module documentation.
pub struct DeadCode;

impl Pass for DeadCode {
    const NAME: &'static str = "dead_code";
    const SUMMARY: &'static str = "remove nodes no output depends on, and stored tensors no weight reads (inputs stay)";
    type Options = crate::options::NoOptions;

    fn run(graph: &mut Graph, _: &Self::Options, _: &Context) -> Result<PassReport, PassError> {
        let nodes = graph.remove_dead();
        let read = graph.read_tensors();
        let unread: Vec<String> =
            graph.store.iter().map(|(name, _)| name.to_string()).filter(|n| !read.contains(n)).collect();
        for name in &unread {
            graph.store.remove(name);
        }
        let mut notes = vec![format!("{nodes} nodes removed")];
        if !unread.is_empty() {
            notes.push(format!("{} stored tensors no weight reads removed: {}", unread.len(), unread.join(", ")));
        }
        Ok(PassReport::Cleanup { pass: Self::NAME, nodes, notes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead nodes go, and so do the stored tensors only they read; inputs stay.
    #[test]
    fn dead_code_drops_nodes_and_their_tensors() {
        let mut g = kiln_ir::parse(
            r#"graph dead {
  %0 = input "x" : f32[b, 8]
  %1 = input "unused" : f32[b, 8]
  %2 = weight "w" f32 : f32[4, 8] @proj
  %3 = linear %0, %2 : f32[b, 4] @proj
  %4 = weight "w2" f32 : f32[4, 8] @spare
  %5 = linear %0, %4 : f32[b, 4] @spare
  output "y" = %3
}
"#,
        )
        .unwrap();
        for name in ["w", "w2"] {
            g.store.insert(name, kiln_ir::TensorData::from_f32(vec![4, 8], &[0.5; 32]));
        }
        let report = DeadCode::run(&mut g, &crate::options::NoOptions, &Context::empty()).unwrap();
        assert_eq!(g.len(), 4, "two inputs, the weight and the linear that feeds the output");
        assert!(g.store.get("w").is_some() && g.store.get("w2").is_none());
        let PassReport::Cleanup { nodes, notes, .. } = report else { panic!("a clean-up report") };
        assert_eq!(nodes, 2);
        assert!(notes.iter().any(|n| n.contains("w2")), "{notes:?}");
    }

    /// A sparse weight reads two tensors: a live one keeps both, a dead one loses both.
    #[test]
    fn dead_code_keeps_or_drops_a_sparse_weight_whole() {
        let mut g = kiln_ir::parse(
            r#"graph dead {
  %0 = input "x" : f32[b, 8]
  %1 = weight "w" f32 sparse 2:4 "w.mask" : f32[4, 8] @proj
  %2 = linear %0, %1 : f32[b, 4] @proj
  %3 = weight "w2" f32 sparse 1:4 "w2.mask" : f32[4, 8] @spare
  %4 = linear %0, %3 : f32[b, 4] @spare
  output "y" = %2
}
"#,
        )
        .unwrap();
        let mask = |n: u64| {
            kiln_ir::TensorData::new(
                kiln_ir::Format::U8,
                vec![4, 1],
                kiln_ir::Bytes::from_vec(vec![0b0011_0011 & if n == 1 { 0x11 } else { 0xff }; 4]),
            )
        };
        g.store.insert("w", kiln_ir::TensorData::from_f32(vec![4, 4], &[0.5; 16]));
        g.store.insert("w.mask", mask(2).unwrap());
        g.store.insert("w2", kiln_ir::TensorData::from_f32(vec![4, 2], &[0.5; 8]));
        g.store.insert("w2.mask", mask(1).unwrap());
        kiln_ir::verify(&g).unwrap();
        DeadCode::run(&mut g, &crate::options::NoOptions, &Context::empty()).unwrap();
        let kept: Vec<&str> = g.store.iter().map(|(name, _)| name).collect();
        assert_eq!(kept, ["w", "w.mask"]);
    }
}
