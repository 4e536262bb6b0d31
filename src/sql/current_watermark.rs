//! `CURRENT_WATERMARK()`: the pipeline's event-time watermark as a TIMESTAMP (NULL before
//! the first one), read at each batch. The engine stores it in the shared cell after
//! every advance: the minimum over the watermarks of sources that declare event time.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use laminar_connectors::format::types::{TIMESTAMP_TZ, timestamp_ms_type};

use crate::operator::watermark::WATERMARK_NONE;

/// The function's name in SQL and in plans.
pub const NAME: &str = "current_watermark";

/// The shared cell: milliseconds, or [`WATERMARK_NONE`].
pub type WatermarkCell = Arc<AtomicI64>;

#[derive(Debug)]
struct CurrentWatermark {
    signature: Signature,
    cell: WatermarkCell,
}

impl PartialEq for CurrentWatermark {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cell, &other.cell)
    }
}
impl Eq for CurrentWatermark {}
impl Hash for CurrentWatermark {
    fn hash<H: Hasher>(&self, state: &mut H) {
        NAME.hash(state);
    }
}

impl ScalarUDFImpl for CurrentWatermark {
    fn name(&self) -> &'static str {
        NAME
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(timestamp_ms_type())
    }
    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let ms = self.cell.load(Ordering::Relaxed);
        let value = (ms != WATERMARK_NONE && ms != i64::MAX).then_some(ms);
        Ok(ColumnarValue::Scalar(ScalarValue::TimestampMillisecond(
            value,
            Some(TIMESTAMP_TZ.into()),
        )))
    }
}

/// The UDF reading `cell`. Volatile, so that planning never folds it into a constant.
#[must_use]
pub fn udf(cell: WatermarkCell) -> ScalarUDF {
    ScalarUDF::new_from_impl(CurrentWatermark {
        signature: Signature::nullary(Volatility::Volatile),
        cell,
    })
}
