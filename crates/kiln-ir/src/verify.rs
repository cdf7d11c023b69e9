//! The verifier: checks every invariant the rest of the compiler relies on. It runs after
//! the front end, after every pass in debug builds and tests, and on parsed IR text.

use crate::format::Format;
use crate::graph::Graph;
use crate::layers::Role;
use crate::op::{Activations, Op};
use crate::sparse::Sparse;
use crate::types::DType;
use std::collections::{HashMap, HashSet};

/// A violated invariant, naming the node by its number in the printed IR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct VerifyError {
    pub location: String,
    pub message: String,
}

/// Checks that
/// - the graph is acyclic and has at least one output;
/// - every node's type equals what [`Op::infer`] computes from its operands;
/// - input names are distinct; inputs are `f32` or `i64` with any shape;
/// - weights are `f32` with fully known shapes; a sparse weight is a matrix with a valid
///   pattern; the values' format is not `u8` and its blocks divide the stored rows; and
///   where the store holds a weight's tensors, their shapes and formats are those
///   [`crate::WeightRef::parts`] gives;
/// - symbols are never used where a known size is required (checked by `infer`);
/// - a `linear`'s `activations` are what [`Activations::for_weight`] gives them on its
///   stored weight (`activations == activations.for_weight(format, k)`; `f32` on a computed
///   weight): `int8` only on integer block formats, `int8-row` only on `int8gK` weights;
/// - every entry of the layer table names a `weight` node of the graph, each layer has
///   exactly one `main` weight (or, factorized, none and one `lowrank_u` and `lowrank_v`),
///   and no node has two roles in one layer.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let order = graph.topo_order().ok_or_else(|| VerifyError {
        location: format!("graph {}", graph.name),
        message: "the graph has a cycle".into(),
    })?;
    let number: HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut input_names = HashSet::new();
    for &id in &order {
        let node = graph.node(id);
        let fail = |message: String| {
            let scope = if node.scope.is_empty() { String::new() } else { format!(" @{}", node.scope) };
            VerifyError { location: format!("%{} ({}{scope})", number[&id], node.op.name()), message }
        };
        let operands = graph.operands(id);
        match &node.op {
            Op::Input { name } => {
                if !operands.is_empty() {
                    return Err(fail("an input takes no operands".into()));
                }
                if !input_names.insert(name.as_str()) {
                    return Err(fail(format!("input `{name}` is declared twice")));
                }
            }
            Op::Weight(w) => {
                if !operands.is_empty() {
                    return Err(fail("a weight takes no operands".into()));
                }
                let shape: Option<Vec<u64>> = node.ty.shape.iter().map(|d| d.known()).collect();
                let Some(shape) = shape.filter(|_| node.ty.dtype == DType::F32) else {
                    return Err(fail(format!("a weight must be f32 with a known shape, found {}", node.ty)));
                };
                if w.format == Format::U8 {
                    return Err(fail("u8 stores the masks of sparse weights, not a weight's values".into()));
                }
                if let Some(s) = &w.sparse {
                    let &[_, cols] = shape.as_slice() else {
                        return Err(fail(format!("a sparse weight is a matrix, not {}", node.ty)));
                    };
                    Sparse::check(s.n, s.m, cols).map_err(|e| fail(e.to_string()))?;
                }
                let parts = w.parts(&shape);
                let block = w.format.block_len();
                if parts[0].shape.last().is_none_or(|r| !r.is_multiple_of(block)) {
                    return Err(fail(format!(
                        "{} stores blocks of {block} values, which must divide the rows of {:?}",
                        w.format, parts[0].shape
                    )));
                }
                for part in &parts {
                    if let Some(t) = graph.store.get(part.tensor)
                        && (t.shape != part.shape || t.format != part.format)
                    {
                        return Err(fail(format!(
                            "tensor `{}` is stored as {} {:?}; the weight's {} must be {} {:?}",
                            part.tensor, t.format, t.shape, part.role, part.format, part.shape
                        )));
                    }
                }
            }
            op => {
                let types: Vec<_> = operands.iter().map(|&o| &graph.node(o).ty).collect();
                let inferred = op.infer(&types).map_err(|e| fail(e.message))?;
                if inferred != node.ty {
                    return Err(fail(format!("type is {} but the operands give {inferred}", node.ty)));
                }
                if let Op::Linear { activations } = op
                    && graph.allowed_activations(id, *activations) != *activations
                {
                    let weight = match graph.linear_weight(id) {
                        Some((format, _)) => format!("a weight stored as {format}"),
                        None => "a computed weight".to_string(),
                    };
                    let needs = match activations {
                        Activations::Int8Row => "int8 weights with one group per row (int8gK, K the row length)",
                        _ => "a weight stored in an integer block format (q8_0, q4_0, q4_1, intBgG[a])",
                    };
                    return Err(fail(format!("activations = {activations} needs {needs}; this linear reads {weight}")));
                }
            }
        }
    }
    for (name, layer) in graph.layers.iter() {
        let fail = |message: String| VerifyError { location: format!("layer {name:?}"), message };
        let mut nodes = HashSet::new();
        for &(role, id) in &layer.weights {
            if !graph.contains(id) {
                return Err(fail(format!("its {role} weight is not a node of the graph")));
            }
            if !matches!(graph.node(id).op, Op::Weight(_)) {
                return Err(fail(format!(
                    "its {role} entry %{} is a {}, not a weight",
                    number[&id],
                    graph.node(id).op.name()
                )));
            }
            if !nodes.insert(id) {
                return Err(fail(format!("%{} has two roles in the layer", number[&id])));
            }
        }
        let mains = layer.role(Role::Main).count();
        if mains != 1 && !layer.is_factored() && !layer.is_train() && !layer.is_tied() {
            return Err(fail(format!(
                "a layer has exactly one main weight (or, factorized, one lowrank_u and one lowrank_v, or two or more tt_cores, or, tied, one shared_base and at most one delta_a and delta_b), this one has {mains}"
            )));
        }
    }
    if graph.outputs().is_empty() {
        return Err(VerifyError {
            location: format!("graph {}", graph.name),
            message: "the graph has no outputs".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A linear's activations must be what its weight's format allows
    /// (`Activations::for_weight`): `int8` on integer block formats, `int8-row` on `int8gK`.
    #[test]
    fn a_linear_takes_only_the_activations_its_weight_allows() {
        let graph = |format: &str, activations: &str| {
            let attr = if activations.is_empty() { String::new() } else { format!(" {{activations = {activations}}}") };
            format!(
                "graph g {{\n  %0 = input \"x\" : f32[2, 64]\n  %1 = weight \"w\" {format} : f32[4, 64]\n  %2 = linear %0, %1{attr} : f32[2, 4]\n  output \"y\" = %2\n}}\n"
            )
        };
        for (format, activations, ok) in [
            ("f32", "", true),
            ("f32", "int8", false),
            ("f16", "int8", false),
            ("fp8g64", "int8", false),
            ("fp8g64", "int8-row", false),
            ("q4_0", "int8", true),
            ("q4_0", "int8-row", false),
            ("int4g32a", "int8", true),
            ("int8g64", "int8", true),
            ("int8g64", "int8-row", true),
            ("int8g32", "int8-row", false),
            ("int8g32", "int8", true),
            ("q8_0", "", true),
        ] {
            let g = crate::parse(&graph(format, activations)).unwrap();
            let result = crate::verify(&g);
            assert_eq!(result.is_ok(), ok, "{format} {{activations = {activations}}}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains(&format!("activations = {activations} needs")), "{e}");
                assert!(e.to_string().contains(&format!("stored as {format}")), "{e}");
            }
        }
        // A computed weight (here negated) allows f32 only, whatever it is computed from.
        let computed = "graph g {\n  %0 = input \"x\" : f32[2, 64]\n  %1 = weight \"w\" q8_0 : f32[4, 64]\n  %2 = neg %1 : f32[4, 64]\n  %3 = linear %0, %2 {activations = int8} : f32[2, 4]\n  output \"y\" = %3\n}\n";
        let err = crate::verify(&crate::parse(computed).unwrap()).unwrap_err();
        assert!(err.to_string().contains("a computed weight"), "{err}");
        assert!(crate::verify(&crate::parse(&computed.replace(" {activations = int8}", "")).unwrap()).is_ok());
    }

    #[test]
    fn a_block_may_not_cross_a_row() {
        let graph = |format: &str, row: u32| {
            format!("graph g {{\n  %0 = weight \"w\" {format} : f32[4, {row}]\n  output \"y\" = %0\n}}\n")
        };
        assert!(crate::verify(&crate::parse(&graph("int4g64", 128)).unwrap()).is_ok());
        let err = crate::verify(&crate::parse(&graph("int4g64", 96)).unwrap()).unwrap_err();
        assert!(err.to_string().contains("blocks of 64"), "{err}");
        assert!(crate::verify(&crate::parse(&graph("q4_0", 48)).unwrap()).is_err());
    }
}
