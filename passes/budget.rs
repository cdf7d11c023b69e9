//! Budgets count stored bytes as the artifact stores them: every weight's bytes in its
//! format (scales and offsets included), over every parameter of the model, not only the
//! layers a pass changes. A pass that spends a budget on its layers first takes out what
//! the rest of the model stores ([`outside_layers`]).

use kiln_ir::{Graph, NodeId, Op};

/// Parameters and stored bytes of the weights for which `in_layer` is false (norms, biases:
/// what a pass's layers leave), each stored tensor counted once.
pub fn outside_layers(graph: &Graph, in_layer: impl Fn(NodeId) -> bool) -> (u64, u64) {
    let (mut params, mut bytes) = (0u64, 0u64);
    let mut seen = std::collections::BTreeSet::new();
    for n in graph.node_ids() {
        if let Op::Weight(w) = &graph.node(n).op
            && !in_layer(n)
            && seen.insert(w.tensor.as_str())
            && graph.store.get(&w.tensor).is_some()
        {
            params += graph.node(n).ty.shape.iter().filter_map(|d| d.known()).product::<u64>();
            bytes += w.stored_bytes(&graph.store);
        }
    }
    (params, bytes)
}
