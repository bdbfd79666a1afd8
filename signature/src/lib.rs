//! What a model expects and what a table holds, and whether they fit: the ONNX graph's inputs
//! and outputs read straight from the model file (no runtime needed, so a coordinator can check
//! a spec without ONNX Runtime), and the column <-> tensor rules the worker applies.

pub mod column_mapping;
pub mod onnx_model;

pub use column_mapping::{
    InputBinding, MappingError, OutputBinding, Shape, TensorPlan, elem_to_arrow, plan_tensors,
};
pub use onnx_model::{Dim, ElemType, ModelSignature, SignatureError, TensorSig};
