//! A small interpreter for the Python expressions fixtures write (`lr_lambda`, `scale_fn`).

/// A Python arithmetic expression of one variable (`"0.95**epoch"`, `"0.9"`, `"epoch // 30"`),
/// as fixtures write `lr_lambda` and `scale_fn`: numbers, the variable, `+ - * / // % **`,
/// parentheses, `min`, `max`, `abs`, `math.cos`, `math.exp`, `math.sqrt`, `math.pi`.
#[derive(Debug, Clone)]
pub struct PyExpr {
    tokens: Vec<String>,
    var: String,
}

impl PyExpr {
    /// Tokenizes `src`; `var` names the variable (`epoch`, `x`).
    pub fn parse(src: &str, var: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let chars: Vec<char> = src.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c.is_ascii_digit() || c == '.' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || chars[i] == '.'
                        || chars[i] == 'e'
                        || chars[i] == 'E'
                        || ((chars[i] == '-' || chars[i] == '+')
                            && matches!(chars[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
                tokens.push(chars[start..i].iter().collect());
            } else if c.is_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                tokens.push(chars[start..i].iter().collect());
            } else if (c == '*' || c == '/') && chars.get(i + 1) == Some(&c) {
                tokens.push(format!("{c}{c}"));
                i += 2;
            } else if "+-*/%(),".contains(c) {
                tokens.push(c.to_string());
                i += 1;
            } else {
                return Err(format!("unsupported character {c:?} in {src:?}"));
            }
        }
        let e = PyExpr {
            tokens,
            var: var.to_string(),
        };
        e.eval(0.0)?;
        Ok(e)
    }

    /// Evaluates with the variable set to `x`.
    pub fn eval(&self, x: f64) -> Result<f64, String> {
        let mut p = ExprParser {
            t: &self.tokens,
            i: 0,
            var: &self.var,
            x,
        };
        let v = p.sum()?;
        if p.i != self.tokens.len() {
            return Err(format!("trailing tokens in {:?}", self.tokens));
        }
        Ok(v)
    }
}

struct ExprParser<'a> {
    t: &'a [String],
    i: usize,
    var: &'a str,
    x: f64,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).map(String::as_str)
    }
    fn next(&mut self) -> Result<&str, String> {
        let t = self.t.get(self.i).ok_or("unexpected end of expression")?;
        self.i += 1;
        Ok(t)
    }
    fn sum(&mut self) -> Result<f64, String> {
        let mut v = self.term()?;
        while let Some(op @ ("+" | "-")) = self.peek() {
            let plus = op == "+";
            self.i += 1;
            let r = self.term()?;
            v = if plus { v + r } else { v - r };
        }
        Ok(v)
    }
    fn term(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(op @ ("*" | "/" | "//" | "%")) = self.peek() {
            let op = op.to_string();
            self.i += 1;
            let r = self.unary()?;
            v = match op.as_str() {
                "*" => v * r,
                "/" => v / r,
                "//" => (v / r).floor(),
                _ => v - r * (v / r).floor(),
            };
        }
        Ok(v)
    }
    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some("-") => {
                self.i += 1;
                Ok(-self.unary()?)
            }
            Some("+") => {
                self.i += 1;
                self.unary()
            }
            _ => self.power(),
        }
    }
    fn power(&mut self) -> Result<f64, String> {
        let base = self.atom()?;
        if self.peek() == Some("**") {
            self.i += 1;
            let exp = self.unary()?;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }
    fn atom(&mut self) -> Result<f64, String> {
        let tok = self.next()?.to_string();
        if tok == "(" {
            let v = self.sum()?;
            return match self.next()? {
                ")" => Ok(v),
                t => Err(format!("expected ), got {t}")),
            };
        }
        if let Ok(v) = tok.parse::<f64>() {
            return Ok(v);
        }
        if tok == self.var {
            return Ok(self.x);
        }
        match tok.as_str() {
            "math.pi" => return Ok(std::f64::consts::PI),
            "math.e" => return Ok(std::f64::consts::E),
            _ => {}
        }
        if self.peek() != Some("(") {
            return Err(format!("unknown name {tok}"));
        }
        self.i += 1;
        let mut args = vec![self.sum()?];
        while self.peek() == Some(",") {
            self.i += 1;
            args.push(self.sum()?);
        }
        match self.next()? {
            ")" => {}
            t => return Err(format!("expected ), got {t}")),
        }
        let one = |f: fn(f64) -> f64| -> Result<f64, String> {
            match args.as_slice() {
                [a] => Ok(f(*a)),
                _ => Err(format!("{tok} takes one argument")),
            }
        };
        match tok.as_str() {
            "min" => Ok(args.iter().copied().fold(f64::INFINITY, f64::min)),
            "max" => Ok(args.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            "abs" => one(f64::abs),
            "float" => one(|a| a),
            "int" => one(f64::trunc),
            "math.cos" => one(f64::cos),
            "math.sin" => one(f64::sin),
            "math.exp" => one(f64::exp),
            "math.sqrt" => one(f64::sqrt),
            "math.log" => one(f64::ln),
            "math.floor" => one(f64::floor),
            other => Err(format!("unknown function {other}")),
        }
    }
}
